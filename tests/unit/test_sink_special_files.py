"""The JSON-lines sink never rotates a path that is not a regular file: `--events
/dev/null` (used by operators and by this project's own tests) once had the device node
renamed to /dev/null.1 and replaced by a growing regular file."""

from __future__ import annotations

import os
import stat

import trio

from aegis_stream.pipeline.sinks import JsonLinesFileSink, SinkBatch


def test_fifo_past_max_bytes_is_written_not_rotated(tmp_path):
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so the sink's open does not block
    try:
        sink = JsonLinesFileSink(fifo, max_bytes=64, backups=2)
        line = b'{"schema":"x","n":1}\n'

        async def main() -> None:
            for _ in range(20):  # 20 x 21 bytes: far past max_bytes
                await sink.write(SinkBatch("audit", line, 1))
                assert os.read(reader, 4096) == line

        trio.run(main)
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
        assert sink.rotations == 0 and sink.events == 20
        assert sorted(p.name for p in tmp_path.iterdir()) == ["events.fifo"]
    finally:
        os.close(reader)


def test_regular_file_still_rotates(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = JsonLinesFileSink(path, max_bytes=64, backups=2)
    line = b'{"schema":"x","n":1}\n'

    async def main() -> None:
        for _ in range(10):
            await sink.write(SinkBatch("audit", line, 1))

    trio.run(main)
    assert sink.rotations >= 2 and (tmp_path / "events.jsonl.1").exists()
