// Test IDL for the real-peer Thrift fixtures (tests/thrift/peers.py).
// The generated Python code is committed in tests/thrift/gen/; after editing
// this file, regenerate it from the repository root with:
//   thrift --gen py -out tests/thrift/gen tests/thrift/echo.thrift && rm tests/thrift/gen/echo/*-remote
// (Debian's thrift-compiler 0.17. The *-remote scripts it also writes are dropped:
// they expect a gen-py/ directory on sys.path and do not run from here.)
namespace py echo

exception Oops {
  1: string why
}

service Echo {
  // Returns its input.
  binary echo(1: binary data),
  // greet("boom") raises Oops(why="boom").
  string greet(1: string name) throws (1: Oops oops),
  // Sleeps `ms` milliseconds, then returns.
  void sleep(1: i32 ms),
  oneway void note(1: string text),
  // How many `note` calls this server process has received so far.
  i32 notes(),
}

service Calc {
  i32 add(1: i32 a, 2: i32 b),
}
