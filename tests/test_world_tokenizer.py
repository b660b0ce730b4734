"""The tiny world's checkpoints load under ``AutoTokenizer`` as shipped, so vLLM (which loads them so)
sees the same ids and text as our own engines."""

from pathlib import Path

from transformers import AutoTokenizer

from eapo.inference.model import load_model

TEXT = "Q: 12 + 3 * 4\nA: <consult>1. 3 * 4 = ?\n</consult><expert>12</expert> so 12 + 12 = 24. \\boxed{24}<eos>"


def test_auto_tokenizer_keeps_every_space_and_newline(world_dir: Path):
    for name in ("policy", "expert"):
        ours = load_model(world_dir / name)[1]
        auto = AutoTokenizer.from_pretrained(world_dir / name)  # Qwen2's own class for a qwen2 checkpoint
        ids = ours.encode(TEXT)
        assert auto.encode(TEXT) == ids
        assert auto.decode(ids) == ours.decode(ids) == TEXT
        assert auto.decode(ours.encode(" a  b\n\nc")) == " a  b\n\nc"
