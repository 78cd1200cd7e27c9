"""The h2 driver's client link keeps its stream table honest when h2 refuses a request's headers."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.settings
import pytest

from meshproxy.drivers.h2 import StreamReset
from tests.drivers.test_h2_flush import HEADERS, _link


async def test_a_stream_whose_headers_h2_refuses_is_forgotten():
    link, peer = _link()
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.local_settings = h2.settings.Settings(client=False, initial_values={
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    server.initiate_connection()
    link.conn.receive_data(server.data_to_send())  # what the reader task would feed it
    link.start_stream(HEADERS, end=True)
    with pytest.raises(StreamReset):  # h2: past the server's stream limit
        link.start_stream(HEADERS, end=True)
    assert list(link.streams) == [1]  # the refused one would take one of the connection's slots for good
    peer.close()
