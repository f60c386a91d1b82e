"""FrameCursor (trioproxy.relay.tunnel) against a reference parser: wsproto's frame decoder.

Seeded random streams of valid frames (payloads of 0 to 70,000 bytes, every opcode, messages
in fragments with control frames between them, masked and unmasked), split at random points
and fed to both. After every piece, what the cursor passed is exactly the stream's first
bytes, as far as wsproto has consumed them (wsproto holds a control frame back until it is
whole, the cursor does not: the one difference); it stands at a boundary exactly when wsproto
is between frames; it has seen a close exactly when wsproto has. With a size limit it stops at
the start of the first frame that takes its message over it, and asked to stop, at the next
boundary.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import pytest
from wsproto.frame_protocol import FrameDecoder, Opcode

from trioproxy.relay.tunnel import FrameCursor

SEED = 19_2026
STREAMS = 400
BUDGET = 8.0  # seconds at most, whatever the machine: fewer streams on a slow one
UNLIMITED = 1 << 62

DATA_OPCODES = (Opcode.TEXT, Opcode.BINARY)
CONTROL_OPCODES = (Opcode.PING, Opcode.PONG, Opcode.CLOSE)


@dataclass(frozen=True)
class Frame:
    opcode: int
    fin: bool
    payload: bytes
    start: int  # offset of its first byte in the stream
    header_end: int
    end: int


def _payload_size(rng: random.Random) -> int:
    kind = rng.random()
    if kind < 0.5:
        return rng.randint(0, 130)  # around the 1-byte length's limit
    if kind < 0.8:
        return rng.choice([125, 126, 127, 65535, 65536]) + rng.randint(-2, 2)  # the edges
    return rng.randint(0, 70000)


def _encode(opcode: int, fin: bool, payload: bytes, masked: bool, rng: random.Random) -> tuple[bytes, int]:
    """The frame's bytes and its header's size (minimal length encoding, as wsproto wants)."""
    size = len(payload)
    first = bytes([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if masked else 0
    if size <= 125:
        head = first + bytes([mask_bit | size])
    elif size <= 0xFFFF:
        head = first + bytes([mask_bit | 126]) + size.to_bytes(2, "big")
    else:
        head = first + bytes([mask_bit | 127]) + size.to_bytes(8, "big")
    if not masked:
        return head + payload, len(head)
    key = rng.randbytes(4)
    stream_key = (key * (size // 4 + 1))[:size]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(stream_key, "big")).to_bytes(size, "big") if size else b""
    return head + key + body, len(head) + 4


def random_stream(rng: random.Random, masked: bool) -> tuple[bytes, list[Frame]]:
    """Whole messages in 1-4 fragments, control frames before, between and after them."""
    parts: list[bytes] = []
    frames: list[Frame] = []
    offset = 0

    def add(opcode: int, fin: bool, payload: bytes) -> None:
        nonlocal offset
        data, header = _encode(opcode, fin, payload, masked, rng)
        frames.append(Frame(opcode, fin, payload, offset, offset + header, offset + len(data)))
        parts.append(data)
        offset += len(data)

    def maybe_control() -> None:
        while rng.random() < 0.3:
            opcode = rng.choice(CONTROL_OPCODES)
            if opcode == Opcode.CLOSE:
                payload = b"" if rng.random() < 0.3 else rng.randint(1000, 4999).to_bytes(2, "big") + b"r" * rng.randint(0, 123)
            else:
                payload = rng.randbytes(rng.randint(0, 125))
            add(opcode, True, payload)

    for _ in range(rng.randint(1, 12)):
        maybe_control()
        fragments = rng.choice([1, 1, 2, 3, 4])
        opcode = rng.choice(DATA_OPCODES)
        for number in range(fragments):
            text = opcode == Opcode.TEXT
            size = _payload_size(rng)
            payload = b"t" * size if text else rng.randbytes(size)
            add(opcode if number == 0 else Opcode.CONTINUATION, number == fragments - 1, payload)
            if number < fragments - 1:
                maybe_control()
    maybe_control()
    return b"".join(parts), frames


def random_pieces(rng: random.Random, frames: list[Frame], size: int) -> list[int]:
    """Where to split: anywhere, and often inside a header or right at a frame's edges."""
    cuts = {size}
    cuts.update(rng.randint(1, size) for _ in range(size // 4000 + 1))
    for frame in frames:
        if rng.random() < 0.7:
            cuts.add(frame.start + rng.randint(0, frame.header_end - frame.start + 1))
        if rng.random() < 0.3:
            cuts.add(frame.end + rng.randint(-2, 2))
    return sorted(cut for cut in cuts if 0 < cut <= size)


def _reference(decoder: FrameDecoder, received: list[tuple[int, bool, bytearray]]) -> None:
    """Run wsproto's decoder as far as it goes; collect frames (partial ones joined)."""
    while True:
        frame = decoder.process_buffer()
        if frame is None:
            return
        if received and not received[-1][1] and frame.opcode == Opcode.CONTINUATION:
            # An unfinished frame's later payload comes as CONTINUATION; its opcode came first.
            received[-1][2].extend(frame.payload)
        else:
            received.append((int(frame.opcode), False, bytearray(frame.payload)))
        if frame.frame_finished:
            opcode, _, payload = received[-1]
            received[-1] = (opcode, True, payload)


def _check_stream(rng: random.Random, masked: bool) -> None:
    stream, frames = random_stream(rng, masked)
    cuts = random_pieces(rng, frames, len(stream))
    ends = {frame.end for frame in frames} | {0}
    header_ends = {frame.header_end for frame in frames}

    # Unlimited: every boundary and every byte as wsproto parses them.
    cursor = FrameCursor(UNLIMITED)
    decoder = FrameDecoder(client=not masked)
    received: list[tuple[int, bool, bytearray]] = []
    passed = 0
    seen_close = False
    fed = 0
    for cut in cuts:
        piece = stream[fed:cut]
        fed = cut
        out = cursor.advance(piece)
        assert out == stream[passed : passed + len(out)]
        passed += len(out)
        decoder.receive_bytes(piece)
        known = max(len(received) - 1, 0)  # the last one may be a frame still growing
        _reference(decoder, received)
        seen_close = seen_close or any(opcode == Opcode.CLOSE for opcode, _, _ in received[known:])
        consumed = fed - len(decoder.buffer)  # what wsproto has taken of the stream
        if decoder.header is not None and decoder.header.opcode.iscontrol():
            # wsproto took its header and waits for the whole payload; the cursor passes it.
            assert passed == fed and consumed in header_ends
        else:
            assert passed == consumed, (passed, consumed, fed)
        assert cursor.at_boundary == (decoder.header is None), (passed, fed)
        if cursor.at_boundary:
            assert passed in ends  # a boundary where a frame of the tunnel's own can go
        in_close = decoder.header is not None and decoder.header.opcode == Opcode.CLOSE
        assert cursor.close_passed == (seen_close or in_close)
        assert not cursor.too_big and cursor.invalid is None
    assert passed == len(stream) and cursor.at_boundary and not cursor.partial
    assert [(opcode, bytes(payload)) for opcode, _, payload in received] == [(f.opcode, f.payload) for f in frames]

    # A size limit: it stops before the first frame that takes its message over it.
    totals = _message_totals(frames)
    limit = max(0, rng.choice(totals) + rng.choice([-1, 0])) if totals and rng.random() < 0.6 else rng.randint(0, 80000)
    over = _first_over(frames, limit)
    cursor = FrameCursor(limit)
    passed = bytearray()
    fed = 0
    for cut in cuts:
        passed += cursor.advance(stream[fed:cut])
        fed = cut
        if over is not None and fed >= over.header_end:
            assert cursor.too_big and bytes(passed) == stream[: over.start]
            assert cursor.advance(b"more") == b""  # and passes nothing after
            break
        assert not cursor.too_big
    else:
        assert over is None and bytes(passed) == stream

    # Asked to stop at some point: it passes up to the next boundary, then nothing.
    cursor = FrameCursor(UNLIMITED)
    passed = bytearray()
    fed = 0
    stop_at = rng.randrange(len(cuts))
    for index, cut in enumerate(cuts):
        piece = stream[fed:cut]
        fed = cut
        if index < stop_at:
            passed += cursor.advance(piece)
            continue
        before = len(passed)
        passed += cursor.advance(piece, stop=True)
        following = min(end for end in ends if end >= before)
        assert len(passed) == (before if before in ends else min(following, fed))
        assert bytes(passed) == stream[: len(passed)]
        if len(passed) in ends:
            assert cursor.at_boundary
            break


def _message_totals(frames: list[Frame]) -> list[int]:
    """Each data frame's message size so far: the edges a limit can fall on."""
    totals, message = [], 0
    for frame in frames:
        if frame.opcode < Opcode.CLOSE:
            message = len(frame.payload) + (message if frame.opcode == Opcode.CONTINUATION else 0)
            totals.append(message)
    return totals


def _first_over(frames: list[Frame], limit: int) -> Frame | None:
    message = 0
    for frame in frames:
        if frame.opcode >= Opcode.CLOSE:
            continue
        message = len(frame.payload) + (message if frame.opcode == Opcode.CONTINUATION else 0)
        if message > limit:
            return frame
        if frame.fin:
            message = 0
    return None


@pytest.mark.parametrize("masked", [True, False], ids=["client-frames", "backend-frames"])
def test_the_cursor_agrees_with_wsproto_over_random_splits(masked: bool) -> None:
    rng = random.Random(SEED + masked)
    deadline = time.monotonic() + BUDGET / 2
    checked = 0
    for _ in range(STREAMS):
        _check_stream(rng, masked)
        checked += 1
        if time.monotonic() > deadline:
            break
    assert checked >= 5  # even on a slow machine, enough to mean something
