"""atheris: the kernel decision record decoders (one record, a batch, the valid split) and the
JSON event decoders (decision, explanation) on arbitrary bytes."""

import atheris

with atheris.instrument_imports(include=["aegis_stream", "tomllib"]):
    import msgspec

    from aegis_stream.kernel import events
    from aegis_stream.pipeline.schema import DecisionEvent, ExplanationEvent

from _harness import main, refusal_ok  # noqa: E402

_dec = msgspec.json.Decoder(DecisionEvent)
_xdec = msgspec.json.Decoder(ExplanationEvent)


def one(data: bytes) -> None:
    try:
        events.decode_raw(data)
    except events.DecodeError:
        pass
    for stride in (events.RECORD_STRIDE, events.EVENT_SIZE):
        if len(data) % stride == 0:
            good, _dropped = events.split_valid(data, stride)
            events.rows(good)
            try:
                events.rows(events.decode_batch(data, stride))
            except events.DecodeError:
                pass
    for dec in (_dec, _xdec):
        try:
            dec.decode(data)
        except msgspec.DecodeError:  # ValidationError included
            pass


if __name__ == "__main__":
    main(refusal_ok(one))
