"""Shared machinery for bench/run.py and bench/memory.py.

Starts the h2c origin (nginx) and the proxies under test from configs generated into a
temporary directory, pins them to CPUs, waits for readiness, runs h2load and checks its
output, and stops everything it started.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import h2.config
import h2.connection
import h2.events

from meshproxy import devcerts

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

PROXY_CPU = 0  # every proxy under test
LOAD_CPU = 1  # the origin and h2load

SIZES = {"small": 100, "16k": 16 * 1024}

TARGETS = ["direct", "meshproxy", "meshproxy-log", "meshproxy-mirror", "meshproxy-mirror-redis",
           "meshproxy-mirror-stalled", "meshproxy-authz", "meshproxy-unit", "meshproxy-risk", "meshproxy-risk-report", "naive", "nginx", "haproxy",
           "direct-tls", "meshproxy-tls", "nginx-tls"]
# Known to start_target but not in run.py's default set: meshproxy-base needs a worktree (BASE_TREE).
AB_ONLY_TARGETS = ["meshproxy-base", "meshproxy-governance"]
DESCRIPTIONS = {
    "direct": "h2load -> origin (no proxy)",
    "meshproxy": "meshproxy, metrics on, access log off",
    "meshproxy-log": "meshproxy, metrics on, access log on (file)",
    "meshproxy-mirror": "meshproxy, metrics on, mirror filter at 100% (request + response, 64 KiB) to the file sink",
    "meshproxy-mirror-redis": "meshproxy, metrics on, mirror filter at 100% to Redis Streams (redis-server on CPU 1)",
    "meshproxy-mirror-stalled": "meshproxy, metrics on, mirror filter at 100% to a Redis that is stopped (SIGSTOP) "
                                "once the proxy is up: the queue fills, then records drop",
    "meshproxy-authz": "meshproxy, metrics on, authz filter with 50 rules, the last one matching",
    "meshproxy-unit": "meshproxy, metrics on, unit_routing with a 10,000-entry table (h2load sends x-user-id: 4242)",
    "meshproxy-risk": "meshproxy, metrics on, risk_control enforce (JSON, 50 ms timeout) against a fixed verdict "
                      "served by the origin nginx",
    "meshproxy-risk-report": "the same in report mode",
    "meshproxy-base": "meshproxy's plain config, run from an older tree (BASE_TREE, a git worktree; "
                      "PYTHONPATH and cwd point at it)",
    "meshproxy-governance": "meshproxy, metrics on, retry with a budget on the route; error breaker per method, "
                            "outlier ejection and dynamic weights on the cluster (nothing fails: the bookkeeping cost)",
    "naive": "naive trio + h2 forwarder (bench/naive_forwarder.py)",
    "direct-tls": "h2load -> origin over TLS (no proxy)",
    "meshproxy-tls": "meshproxy, TLS from h2load (TLS 1.3; h2load sends no client certificate), "
                     "mutual TLS to the origin",
    "nginx-tls": "nginx grpc_pass, TLS from h2load, mutual TLS to the origin (grpcs, keepalive upstream)",
    "nginx": "nginx grpc_pass, 1 worker, keepalive upstream",
    "haproxy": "haproxy proto h2 both sides, nbthread 1",
}


def warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loud(msg: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n!!! {msg}\n{bar}\n", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(size: int) -> bytes:
    """A deterministic body whose every byte position is checkable."""
    pattern = b"".join(b"%08d\n" % i for i in range(size // 9 + 1))
    return pattern[:size]


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    new_hard = hard
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
        except OSError:
            nr_open = hard
        new_hard = max(hard, min(want, nr_open))
    new_soft = min(want, new_hard) if new_hard != resource.RLIM_INFINITY else want
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, new_hard))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _pinning() -> str:
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        return "none"
    if not {PROXY_CPU, LOAD_CPU} <= cpus:
        return "none"
    return "taskset" if shutil.which("taskset") else "sched_setaffinity"


PINNING = _pinning()


def pinned(argv: list[str], cpu: int) -> tuple[list[str], object]:
    """(argv, preexec_fn) that run argv on one CPU, as well as this machine allows."""
    if PINNING == "taskset":
        return ["taskset", "-c", str(cpu), *argv], None
    if PINNING == "sched_setaffinity":
        return argv, lambda: os.sched_setaffinity(0, {cpu})
    return argv, None


def proc_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of pid and its descendants."""
    total = 0
    for p in proc_tree(pid):
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12])  # utime, stime
    return total / CLK_TCK


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return [0.0, 0.0, 0.0]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


# --------------------------------------------------------------------------- configs

def nginx_common(d: Path, name: str) -> str:
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
daemon off;
master_process on;
pid {d}/{name}.pid;
error_log {d}/{name}.error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
"""


def temp_paths(d: Path, name: str) -> str:
    return "".join(
        f"  {k}_temp_path {d}/{name}-{k};\n"
        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def origin_conf(d: Path, port: int, tls_port: int) -> str:
    c = d / "certs"
    return nginx_common(d, "origin") + f"""http {{
  access_log off;
  default_type application/octet-stream;
{temp_paths(d, "origin")}  sendfile off;                   # with sendfile, h2 responses at c=1 stall ~40 ms (delayed ACK)
  tcp_nodelay on;
  open_file_cache max=16;
  keepalive_requests 100000000;   # no GOAWAY after 1000 requests on a connection
  keepalive_timeout 600s;
  http2_max_concurrent_streams 1024;
  server {{
    listen 127.0.0.1:{port} http2;
    root {d}/www;
    location = /small {{ }}
    location = /16k {{ }}
    # A risk service for the risk_control targets: a fixed JSON verdict for a POST
    # (nginx answers POST on a static file with 405; error_page turns that into the file).
    location = /v1/risk/check {{ default_type application/json; error_page 405 =200 $uri; }}
    location / {{ return 404; }}
  }}
  server {{
    listen 127.0.0.1:{tls_port} ssl http2;
    ssl_certificate {c}/server.pem;
    ssl_certificate_key {c}/server-key.pem;
    ssl_client_certificate {c}/ca.pem;
    ssl_verify_client optional;     # the proxies present one (mutual TLS); h2load (direct-tls) cannot
    ssl_protocols TLSv1.2 TLSv1.3;
    root {d}/www;
    location = /small {{ }}
    location = /16k {{ }}
    location / {{ return 404; }}
  }}
}}
"""


def nginx_proxy_conf(d: Path, port: int, origin: int) -> str:
    return nginx_common(d, "nginx") + f"""http {{
  access_log off;
{temp_paths(d, "nginx")}  tcp_nodelay on;
  keepalive_requests 100000000;
  keepalive_timeout 600s;
  http2_max_concurrent_streams 128;
  upstream origin {{
    server 127.0.0.1:{origin};
    keepalive 1024;                 # grpc_pass: one upstream connection per request in flight
    keepalive_requests 100000000;
    keepalive_timeout 600s;
  }}
  server {{
    listen 127.0.0.1:{port} http2;
    location / {{ grpc_pass grpc://origin; }}
  }}
}}
"""


def nginx_tls_proxy_conf(d: Path, port: int, origin_tls: int) -> str:
    c = d / "certs"
    return nginx_common(d, "nginx") + f"""http {{
  access_log off;
{temp_paths(d, "nginx")}  tcp_nodelay on;
  keepalive_requests 100000000;
  keepalive_timeout 600s;
  http2_max_concurrent_streams 128;
  upstream origin {{
    server 127.0.0.1:{origin_tls};
    keepalive 1024;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
  }}
  server {{
    listen 127.0.0.1:{port} ssl http2;
    ssl_certificate {c}/server.pem;
    ssl_certificate_key {c}/server-key.pem;
    location / {{
      grpc_pass grpcs://origin;
      grpc_ssl_certificate {c}/client.pem;
      grpc_ssl_certificate_key {c}/client-key.pem;
      grpc_ssl_trusted_certificate {c}/ca.pem;
      grpc_ssl_verify on;
      grpc_ssl_name localhost;       # nginx checks DNS names, not IP SANs
      grpc_ssl_session_reuse on;
    }}
  }}
}}
"""


def haproxy_conf(d: Path, port: int, origin: int) -> str:
    return f"""global
  nbthread 1
  maxconn 8000                      # haproxy wants ~2 fds per conn; the fd limit here may be 20000
  pidfile {d}/haproxy.pid

defaults
  mode http
  timeout connect 5s
  timeout client 600s
  timeout server 600s
  timeout http-keep-alive 600s

frontend fe
  bind 127.0.0.1:{port} proto h2
  default_backend be

backend be
  http-reuse always
  server origin 127.0.0.1:{origin} proto h2
"""


def authz_rules(n: int) -> str:
    """n rules; only the last one matches the bench's calls (the worst case for first-match)."""
    rules = [f"          - {{name: r{i}, action: allow, principals: [\"spiffe://mesh/ns/other/sa/s{i}\"], "
             f"paths: [\"/svc{i}/\"]}}\n" for i in range(n - 1)]
    rules.append("          - {name: bench, action: allow, paths: [/small, /16k]}\n")
    return "    filters:\n      - name: authz\n        default: deny\n        rules:\n" + "".join(rules)


def unit_table(n: int) -> str:
    """unit_routing with an n-entry table; every unit's target is the origin (the lookup is what is measured)."""
    table = ", ".join(f"'{i}': u{i % 4}" for i in range(n))
    return ("    filters:\n      - {name: unit_routing, key: {header: x-user-id}, "
            f"table: {{{table}}}, default: u0, targets: {{u0: origin, u1: origin, u2: origin, u3: origin}}}}\n")


def risk_filter(mode: str) -> str:
    return (f"    filters:\n      - {{name: risk_control, cluster: risk, mode: {mode}, timeout: 50ms, "
            "failure_mode: allow, protocol: json}\n")


# meshproxy-governance: the governance options that act on every call of the plain path (no health check:
# it is off the request path). Nothing fails in the bench, so this measures bookkeeping, not retries.
GOVERNANCE_ROUTE = ("        retry: {attempts: 3, retry_on: [connect-failure, refused-stream, gateway-error], "
                    "budget: {ratio: 0.2, min_per_second: 3}}\n")
GOVERNANCE_CLUSTER = ("    breaker: {key: method, error_ratio: 0.5, min_requests: 20, max_requests: 10000}\n"
                      "    outlier: {consecutive_errors: 5}\n"
                      "    dynamic_weights: true\n")

# meshproxy-base runs meshproxy from this tree (a git worktree of an older commit), e.g.
#   git worktree add /tmp/mp-base d8e0261
# ab.py --base-tree sets it.
BASE_TREE = Path(os.environ.get("MESHPROXY_BASE_TREE", "/tmp/mp-base"))


def base_tree_env(tree: Path) -> dict:
    """The environment that makes a meshproxy process import the package from `tree`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def check_base_tree(tree: Path, env: dict) -> str:
    """Fail unless the interpreter that runs meshproxy imports the package from `tree`; return its git describe."""
    if not (tree / "meshproxy" / "__init__.py").is_file():
        raise RuntimeError(f"no meshproxy package under {tree}: create it with "
                           f"`git worktree add {tree} <commit>`")
    exe = meshproxy_argv(Path("x"))[0]
    py = sys.executable
    if exe != sys.executable:  # the console script: use its interpreter (its #! line)
        with contextlib.suppress(OSError, UnicodeDecodeError):
            first = Path(exe).read_text().splitlines()[0]
            if first.startswith("#!") and "python" in first and " " not in first[2:].strip():
                py = first[2:].strip()
    code = ("import importlib.util, meshproxy; "
            "print(meshproxy.__file__); print(importlib.util.find_spec('meshproxy.upstream.guard') is not None)")
    cp = subprocess.run([py, "-c", code], env=env, cwd=tree, capture_output=True, text=True, timeout=30)
    lines = cp.stdout.split()
    if cp.returncode != 0 or not lines or not Path(lines[0]).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"{py} with PYTHONPATH={tree} imports meshproxy from {lines[:1]} "
                           f"(exit {cp.returncode}): {cp.stderr.strip()}")
    rev = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    warn(f"meshproxy-base: package from {lines[0]} (git {rev}); "
         f"meshproxy.upstream.guard {'present' if lines[1] == 'True' else 'absent'}")
    return rev


# Request headers h2load adds for a target (the unit routing key).
TARGET_HEADERS = {"meshproxy-unit": ["-H", "x-user-id: 4242"]}


def meshproxy_conf(port: int, admin: int, origin: int, access_log: str | None, mirror: str | None = None,
                   tls_dir: Path | None = None, filters: str = "", risk: int = 0,
                   route_extra: str = "", cluster_extra: str = "") -> str:
    log = f"{{enabled: true, path: {access_log}}}" if access_log else "{enabled: false}"
    mirror_top = f"mirror: {{sink: {mirror}, queue_size: 20000}}\n" if mirror else ""
    filters = filters or ("    filters:\n      - {name: mirror, sample: 1.0, max_body_bytes: 65536, "
                          "capture_response: true}\n" if mirror else "")
    listener_tls = cluster_tls = ""
    risk_cluster = f"  - name: risk\n    protocol: http2\n    endpoints: [\"127.0.0.1:{risk}\"]\n" if risk else ""
    if tls_dir is not None:
        listener_tls = f"    tls: {{mode: strict, cert: {tls_dir}/server.pem, key: {tls_dir}/server-key.pem}}\n"
        cluster_tls = (f"    tls: {{mode: mutual, cert: {tls_dir}/client.pem, key: {tls_dir}/client-key.pem, "
                       f"ca: {tls_dir}/ca.pem}}\n")
    return f"""node: {{service: bench, unit: u1}}
admin: {{address: 127.0.0.1:{admin}}}
access_log: {log}
{mirror_top}listeners:
  - name: bench
    direction: egress
    address: 127.0.0.1:{port}
    protocol: http2
{listener_tls}{filters}    routes:
      - match: {{prefix: /}}
        cluster: origin
        timeout: 30s
{route_extra}clusters:
  - name: origin
    protocol: http2
    endpoints: ["127.0.0.1:{origin}"]
{cluster_extra}{cluster_tls}{risk_cluster}"""


def meshproxy_argv(conf: Path) -> list[str]:
    exe = shutil.which("meshproxy")
    if exe:
        return [exe, "--conf", str(conf)]
    return [sys.executable, "-m", "meshproxy", "--conf", str(conf)]


# --------------------------------------------------------------------------- processes

class Service:
    def __init__(self, name: str, proc: subprocess.Popen, port: int, log: Path,
                 admin: int | None = None, scheme: str = "http") -> None:
        self.name, self.proc, self.port, self.log, self.admin = name, proc, port, log, admin
        self.scheme = scheme
        self.tls_port = 0  # the origin's TLS port

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Bench:
    """Owns a temp dir and every process it starts; close() stops them all."""

    def __init__(self, keep: bool = False, nofile: int = 0) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="meshbench-"))
        os.chmod(self.dir, 0o755)
        self.keep = keep
        self.nofile = nofile
        self.services: list[Service] = []
        self.base_rev = ""  # git describe of BASE_TREE once meshproxy-base started
        www = self.dir / "www"
        www.mkdir()
        for name, size in SIZES.items():
            (www / name).write_bytes(body(size))
        (www / "v1" / "risk").mkdir(parents=True)
        (www / "v1" / "risk" / "check").write_bytes(b'{"verdict": "ALLOW", "reason": "bench"}')
        for d in (www / "v1", www / "v1" / "risk"):
            d.chmod(0o755)
        www.chmod(0o755)
        self.certs = devcerts.write(self.dir / "certs", server="origin", client="bench")

    # context manager: always clean up, also on Ctrl-C
    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _preexec(self, pin):
        nofile = self.nofile

        def fn() -> None:
            os.setsid()
            if nofile:
                raise_nofile(nofile)
            if pin:
                pin()
        return fn

    def start(self, name: str, argv: list[str], port: int, cpu: int | None,
              admin: int | None = None, env: dict | None = None, cwd: Path | None = None) -> Service:
        pin = None
        if cpu is not None:
            argv, pin = pinned(argv, cpu)
        log = self.dir / f"{name}.out"
        with open(log, "wb") as f:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                    preexec_fn=self._preexec(pin), cwd=cwd or self.dir, env=env)
        svc = Service(name, proc, port, log, admin)
        self.services.append(svc)
        return svc

    def stop(self, svc: Service) -> None:
        if svc in self.services:
            self.services.remove(svc)
        if svc.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(svc.proc.pid, signal.SIGCONT)  # a stalled (stopped) peer must see the SIGTERM
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(svc.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                svc.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def close(self) -> None:
        for svc in reversed(list(self.services)):
            try:
                self.stop(svc)
            except Exception as e:  # keep stopping the others
                warn(f"stopping {svc.name}: {e}")
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            warn(f"kept {self.dir}")

    # ---------------------------------------------------------------- readiness

    def wait_tcp(self, svc: Service, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not svc.alive():
                raise RuntimeError(f"{svc.name} exited ({svc.proc.returncode}):\n{svc.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", svc.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{svc.name} not listening on {svc.port} after {timeout}s:\n{svc.log_tail()}")

    def wait_ready(self, svc: Service, timeout: float = 10.0) -> None:
        url = f"http://127.0.0.1:{svc.admin}/ready"
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not svc.alive():
                raise RuntimeError(f"{svc.name} exited ({svc.proc.returncode}):\n{svc.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
                    last = f"HTTP {r.status}"
            except Exception as e:  # connection refused, 503 while starting, ...
                last = str(e)
            time.sleep(0.1)
        raise RuntimeError(f"{svc.name}: {url} not 200 after {timeout}s ({last}):\n{svc.log_tail()}")

    # ---------------------------------------------------------------- the services

    def start_origin(self) -> Service:
        port, tls_port = free_port(), free_port()
        conf = self.dir / "origin.conf"
        conf.write_text(origin_conf(self.dir, port, tls_port))
        svc = self.start("origin", ["nginx", "-c", str(conf), "-e", str(self.dir / "origin.stderr.log")],
                         port, LOAD_CPU)
        svc.tls_port = tls_port
        self.wait_tcp(svc)
        return svc

    def refresh_origin(self) -> None:
        """Reload the origin (fresh workers, fresh connections) before a measurement.

        nginx slows down on an HTTP/2 connection that has carried a few
        hundred thousand requests (its per-connection memory is only freed
        when the connection closes): seen here as a proxy that keeps one
        pooled upstream connection losing half its /16k throughput over
        three runs, recovering at once after an origin reload. Reloading
        before every measurement gives every target the same fresh origin.
        """
        conf = self.dir / "origin.conf"
        subprocess.run(["nginx", "-c", str(conf), "-e", str(self.dir / "origin.stderr.log"), "-s", "reload"],
                       check=True, capture_output=True, timeout=10)
        time.sleep(0.5)  # old workers finish and close; new ones take over

    def start_target(self, target: str, origin: Service) -> Service | None:
        """Start one target (None for direct) and wait until it is ready."""
        if target == "direct":
            return None
        if target == "direct-tls":
            return Service("direct-tls", origin.proc, origin.tls_port, origin.log, scheme="https")
        port = free_port()
        d = self.dir
        if target.startswith("meshproxy"):
            admin = free_port()
            log = str(d / "access.log") if target == "meshproxy-log" else None
            conf = d / f"{target}.yaml"
            sink = None
            if target == "meshproxy-mirror":
                sink = f"{{type: file, directory: {d / 'mirror'}, fsync: interval, retention_bytes: 512MiB}}"
            elif target in ("meshproxy-mirror-redis", "meshproxy-mirror-stalled"):
                redis_port = free_port()
                redis = self.start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                             "--save", "", "--appendonly", "no"], redis_port, LOAD_CPU)
                self.wait_tcp(redis)
                sink = f"{{type: redis, url: 'redis://127.0.0.1:{redis_port}', max_length: 100000}}"
            tls_dir = self.dir / "certs" if target == "meshproxy-tls" else None
            upstream = origin.tls_port if tls_dir else origin.port
            filters = (authz_rules(50) if target == "meshproxy-authz"
                       else unit_table(10_000) if target == "meshproxy-unit"
                       else risk_filter("report" if target.endswith("report") else "enforce")
                       if target.startswith("meshproxy-risk") else "")
            risk = origin.port if target.startswith("meshproxy-risk") else 0
            gov = target == "meshproxy-governance"
            conf.write_text(meshproxy_conf(port, admin, upstream, log, sink, tls_dir, filters, risk,
                                           GOVERNANCE_ROUTE if gov else "", GOVERNANCE_CLUSTER if gov else ""))
            env = cwd = None
            if target == "meshproxy-base":
                env, cwd = base_tree_env(BASE_TREE), BASE_TREE
                self.base_rev = check_base_tree(BASE_TREE, env)
            svc = self.start(target, meshproxy_argv(conf), port, PROXY_CPU, admin=admin, env=env, cwd=cwd)
            if tls_dir:
                svc.scheme = "https"
            self.wait_ready(svc)
            self.wait_tcp(svc)
            if target == "meshproxy-mirror-stalled":
                # Stalled, not dead: connections stay open and every write waits for its timeout.
                os.killpg(redis.proc.pid, signal.SIGSTOP)
            return svc
        if target == "naive":
            argv = [sys.executable, str(HERE / "naive_forwarder.py"),
                    "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{origin.port}"]
        elif target in ("nginx", "nginx-tls"):
            conf = d / "nginx.conf"
            conf.write_text(nginx_tls_proxy_conf(d, port, origin.tls_port) if target == "nginx-tls"
                            else nginx_proxy_conf(d, port, origin.port))
            argv = ["nginx", "-c", str(conf), "-e", str(d / "nginx.stderr.log")]
        elif target == "haproxy":
            conf = d / "haproxy.cfg"
            conf.write_text(haproxy_conf(d, port, origin.port))
            argv = ["haproxy", "-db", "-f", str(conf)]
        else:
            raise ValueError(f"unknown target {target!r}")
        svc = self.start(target, argv, port, PROXY_CPU)
        if target == "nginx-tls":
            svc.scheme = "https"
        self.wait_tcp(svc)
        return svc


# --------------------------------------------------------------------------- checks & h2load

def fetch(port: int, path: str, timeout: float = 10.0, ca: Path | None = None) -> tuple[int, bytes]:
    """One GET over h2c (prior knowledge), or h2 over TLS when `ca` is given: (status, body)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "GET"), (":scheme", "http"),
                            (":authority", f"127.0.0.1:{port}"), (":path", path)], end_stream=True)
    status, data = 0, bytearray()
    with contextlib.ExitStack() as stack:
        s = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=timeout))
        if ca is not None:
            ctx = ssl.create_default_context(cafile=str(ca))
            ctx.set_alpn_protocols(["h2"])
            s = stack.enter_context(ctx.wrap_socket(s, server_hostname="127.0.0.1"))
        s.sendall(conn.data_to_send())
        done = False
        while not done:
            chunk = s.recv(65536)
            if not chunk:
                break
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    done = True
            s.sendall(conn.data_to_send())
    return status, bytes(data)


def check_bodies(port: int, ca: Path | None = None) -> list[str]:
    problems = []
    for name, size in SIZES.items():
        try:
            status, got = fetch(port, "/" + name, ca=ca)
        except Exception as e:
            problems.append(f"GET /{name}: {e!r}")
            continue
        if status != 200 or got != body(size):
            problems.append(f"GET /{name}: status {status}, {len(got)} bytes, "
                            f"body {'matches' if got == body(size) else 'DIFFERS'}")
    return problems


H2LOAD_RE = {
    "finished": re.compile(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s"),
    "requests": re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                           r"(\d+) failed, (\d+) errored, (\d+) timeout"),
    "status": re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx"),
    "traffic": re.compile(r"traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers .*?\((\d+)\) data"),
}


def parse_h2load(out: str) -> dict:
    r: dict = {}
    m = H2LOAD_RE["finished"].search(out)
    if m:
        r["rps"] = float(m.group(3))
        r["seconds"] = float(m.group(1)) / {"us": 1e6, "ms": 1e3, "s": 1}[m.group(2)]
    m = H2LOAD_RE["requests"].search(out)
    if m:
        keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
        r.update(zip(keys, map(int, m.groups()), strict=True))
    m = H2LOAD_RE["status"].search(out)
    if m:
        r.update(zip(("s2xx", "s3xx", "s4xx", "s5xx"), map(int, m.groups()), strict=True))
    m = H2LOAD_RE["traffic"].search(out)
    if m:
        r.update(zip(("bytes_total", "bytes_headers", "bytes_data"), map(int, m.groups()), strict=True))
    return r


def h2load_problems(r: dict, expect_n: int | None = None, size: int | None = None,
                    slack: int = 0) -> list[str]:
    """Everything that makes a run invalid: failures, errors, non-2xx, short bodies.

    In timing-based runs (-D) h2load's status-code count can trail "succeeded" by the
    requests still in flight when the clock stops, and its byte counts include the
    warm-up: pass slack = clients x streams and no size there.
    """
    p = []
    if "rps" not in r or "done" not in r or "s2xx" not in r:
        return ["could not parse h2load output"]
    if r["exit"] != 0:
        p.append(f"h2load exited with {r['exit']}")
    if r["failed"] or r["errored"] or r["timeout"]:
        p.append(f"{r['failed']} failed, {r['errored']} errored, {r['timeout']} timeout")
    if r["s3xx"] or r["s4xx"] or r["s5xx"] or abs(r["succeeded"] - r["s2xx"]) > slack:
        p.append(f"status codes: {r['s2xx']} 2xx, {r['s3xx']} 3xx, {r['s4xx']} 4xx, {r['s5xx']} 5xx "
                 f"of {r['succeeded']} succeeded")
    if r["succeeded"] == 0:
        p.append("no request succeeded")
    if expect_n is not None and r["succeeded"] != expect_n:
        p.append(f"{r['succeeded']} of {expect_n} requests succeeded")
    if size is not None and "bytes_data" in r and r["bytes_data"] != r["succeeded"] * size:
        p.append(f"{r['bytes_data']} body bytes for {r['succeeded']} x {size}")
    return p


def h2load(args: list[str], timeout: float) -> tuple[dict, str]:
    argv, pre = pinned(["h2load", *args], LOAD_CPU)
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, preexec_fn=pre)
    out = cp.stdout + cp.stderr
    r = parse_h2load(out)
    r["exit"] = cp.returncode
    return r, out
