"""Real-peer Thrift fixtures: Apache thrift servers and clients of tests/thrift/echo.thrift.

The generated code in gen/ imports its siblings relatively (`from .ttypes import *`)
and the thrift library absolutely, so `from tests.thrift.gen.echo import Echo` works
with no sys.path changes. Note that this package is named `thrift`: never put the
`tests/` directory itself on sys.path, or it would shadow the Apache library.
"""
