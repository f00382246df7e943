"""Random stand-ins for weights that cannot be downloaded here: used by the tests and the GPU benchmark."""

from __future__ import annotations

from pathlib import Path


def make_tiny_clip(path: Path, hidden_size: int = 32) -> Path:
    """A random CLIPTextModel + a 23-token BPE tokenizer saved with save_pretrained (no hub access)."""
    import json

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>", "t</w>",
             "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), unk_token="<unk>",
                              pad_token="<|endoftext|>")
    tokenizer.save_pretrained(str(path))
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=37,
                            num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                            bos_token_id=21, eos_token_id=22, pad_token_id=22)
    CLIPTextModel(config).save_pretrained(str(path))
    return path
