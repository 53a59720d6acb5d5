import uuid

from conveyor import ids


def test_uuid4_is_a_standard_version_4_uuid() -> None:
    made = [ids.uuid4() for _ in range(2000)]
    assert len(set(made)) == len(made)
    for value in made[:200]:
        parsed = uuid.UUID(str(value))
        assert value == parsed and hash(value) == hash(parsed)
        assert value.version == 4 and value.variant == uuid.RFC_4122
        assert value.is_safe is uuid.SafeUUID.unknown
        assert uuid.UUID(bytes=value.bytes, version=4) == value
    # Every random bit is used: over many ids, each of the 122 bits is seen both ways.
    ones = 0
    zeros = 0
    for value in made:
        ones |= value.int
        zeros |= ~value.int
    random_bits = (1 << 128) - 1 & ~((0xC000 << 48) | (0xF000 << 64))
    assert ones & random_bits == random_bits
    assert zeros & random_bits == random_bits


def test_uuid4_text_is_a_canonical_version_4_uuid() -> None:
    made = [ids.uuid4_text() for _ in range(2000)]
    assert len(set(made)) == len(made)
    variants = set()
    for text in made:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        variants.add(text[19])
    assert variants == set("89ab")
