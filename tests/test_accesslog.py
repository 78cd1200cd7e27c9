"""The access log survives what filters put in it."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from meshproxy.accesslog import AccessLog
from meshproxy.config import AccessLog as AccessLogConfig
from meshproxy.metrics import Metrics


def test_a_lone_surrogate_in_a_field_is_escaped_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(AccessLogConfig(True, str(path)), Metrics.create(CollectorRegistry()))
    log.open()
    log.write({"risk_reason": "a\ud800b"})
    log.write({"path": "/café"})
    log.flush()
    log.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert '"risk_reason":"a\\ud800b"' in lines[0] and '"path":"/café"' in lines[1]
