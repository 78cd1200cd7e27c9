// Test IDL for the Thrift end-to-end tests. Generated code lives in gen/;
// regenerate with (from the repository root):
//   thrift --gen py -out tests/peers/gen tests/peers/echo.thrift
namespace py echo

exception Oops {
  1: string why
}

service Echo {
  binary echo(1: binary data),
  string greet(1: string name) throws (1: Oops oops),
  void sleep(1: i32 ms),
  oneway void note(1: string text),
  i32 notes(),
  // The THeader key/values of this very call (empty for other transports).
  map<string, string> headers(),
}

service Calc {
  i32 add(1: i32 a, 2: i32 b),
}
