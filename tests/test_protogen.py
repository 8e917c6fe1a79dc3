"""The committed gRPC code in engine/api must be what proto/ generates today."""

from engine.serving.protogen import OUT_DIR, generate


def test_generated_code_is_current() -> None:
    stale = [rel for rel, text in generate().items()
             if not (OUT_DIR / rel).is_file() or (OUT_DIR / rel).read_text() != text]
    assert not stale, f"stale generated code {stale}: run `python -m engine.serving.protogen`"
