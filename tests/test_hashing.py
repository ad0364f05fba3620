"""data_pipeline.hashing: the values are pinned (seeds and cache keys built from them must never change)."""
import hashlib

from data_pipeline.hashing import seed63, sha256_file, sha256_hex, sha256_int


def test_pinned_values():
    assert sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert sha256_hex(b"abc") == sha256_hex("abc") == hashlib.sha256(b"abc").hexdigest()
    assert seed63("rl-rollout|2026|7") == 2987108957453351786
    assert sha256_int("layers.0.self_attn.q_proj.lora_a", 4) == int.from_bytes(
        hashlib.sha256(b"layers.0.self_attn.q_proj.lora_a").digest()[:4], "little")


def test_same_as_the_expressions_they_replaced(tmp_path):
    for text in ("", "a|b|c", "ü中文\n", "gs://bucket/run"):
        digest = hashlib.sha256(text.encode()).digest()
        assert sha256_hex(text) == digest.hex()
        assert sha256_int(text, 3) == int.from_bytes(digest[:3], "little")
        assert seed63(text) == int.from_bytes(digest[:8], "little") >> 1 < 2 ** 63
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 9000)  # > one 1 MiB chunk
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path, chunk_bytes=7) == sha256_file(path)
