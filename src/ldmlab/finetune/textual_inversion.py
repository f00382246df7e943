"""Textual Inversion: new tokens whose embedding rows alone are trained (Gal et al. 2022, arXiv:2208.01618).

The text encoder's token embedding is wrapped by `ExtendedEmbedding`: the original matrix stays a frozen
tensor and the new rows are a separate parameter, so the optimizer (weight decay included) can only move the
new rows and every other row is bit-identical after training. A concept of n vectors uses diffusers' token
names `<tok>`, `<tok>_1`, ..., `<tok>_{n-1}`, and a prompt's `<tok>` is expanded to all of them
(`expand_prompt`, as diffusers' `maybe_convert_prompt`). Files are diffusers' learned-embeds safetensors,
`{"<tok>": (n, D)}`, which `pipe.load_textual_inversion(path)` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


class ExtendedEmbedding(nn.Module):
    """A frozen nn.Embedding with `new` rows appended: ids >= the base vocabulary read `new`."""

    def __init__(self, base: nn.Embedding, new: Tensor) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.new = nn.Parameter(new.to(base.weight))

    @property
    def weight(self) -> Tensor:
        """The whole matrix (what resize/readers expect); training reads the two parts without this copy."""
        return torch.cat([self.base.weight, self.new])

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + self.new.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, ids: Tensor) -> Tensor:
        n = self.base.num_embeddings
        old = self.base(ids.clamp(max=n - 1))
        added = self.new[(ids - n).clamp(min=0, max=self.new.shape[0] - 1)]
        return torch.where((ids >= n).unsqueeze(-1), added, old)

    def grow(self, rows: Tensor) -> None:
        """Append more new rows (a second concept), keeping the trained ones."""
        self.new = nn.Parameter(torch.cat([self.new.detach(), rows.to(self.new)]), self.new.requires_grad)


def concept_tokens(token: str, num_vectors: int) -> list[str]:
    """diffusers' names for a concept of `num_vectors` embeddings: token, token_1, ..., token_{n-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_prompt(prompt: str, tokenizer: Any) -> str:
    """Write each multi-vector concept token of `prompt` as all its tokens (diffusers' maybe_convert_prompt)."""
    added = tokenizer.get_added_vocab()
    for token in [t for t in added if f"{t}_1" in added and t in prompt]:
        i, replacement = 1, token
        while f"{token}_{i}" in added:
            replacement += f" {token}_{i}"
            i += 1
        prompt = prompt.replace(token, replacement)
    return prompt


def init_vector(tokenizer: Any, encoder: nn.Module, word: str) -> Tensor:
    """The embedding of `word`, which must be a single token of the vocabulary (one line otherwise)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"model.finetune.init_word={word!r} is {len(ids)} tokens {pieces}, not one: choose a "
                         "word of the concept's category that the tokenizer keeps whole")
    return encoder.get_input_embeddings()(torch.tensor(ids)).detach()[0]


def add_concept(tokenizer: Any, encoder: nn.Module, token: str, vectors: Tensor) -> list[str]:
    """Add `token` (and token_1, ... for more rows of `vectors` (n, D)) with these embeddings; returns the tokens."""
    embedding = encoder.get_input_embeddings()
    width = embedding.embedding_dim
    if vectors.ndim != 2 or vectors.shape[1] != width:
        raise ValueError(f"embedding for {token!r} has shape {tuple(vectors.shape)} but this text encoder's "
                         f"tokens have width {width}: the file was made for another text encoder")
    tokens = concept_tokens(token, vectors.shape[0])
    taken = [t for t in tokens if tokenizer.convert_tokens_to_ids(t) != tokenizer.unk_token_id]
    if taken:
        raise ValueError(f"model.finetune.token={taken[0]!r} is already in the tokenizer's vocabulary: choose a "
                         "new placeholder such as '<my-concept>'")
    first = len(tokenizer)
    if tokenizer.add_tokens(tokens) != len(tokens) or (
            tokenizer.convert_tokens_to_ids(tokens) != list(range(first, first + len(tokens)))):
        raise RuntimeError(f"tokenizer gave {tokens} ids {tokenizer.convert_tokens_to_ids(tokens)}, not the rows "
                           f"{first}... appended to the embedding")
    if isinstance(embedding, ExtendedEmbedding):
        embedding.grow(vectors)
    else:
        if embedding.num_embeddings != first:
            raise ValueError(f"text encoder has {embedding.num_embeddings} token embeddings but its tokenizer "
                             f"{first} tokens: they do not belong together")
        encoder.set_input_embeddings(ExtendedEmbedding(embedding, vectors))
    return tokens


def learned_embeds(tokenizer: Any, encoder: nn.Module, token: str) -> dict[str, Tensor]:
    """{token: (n, D)} of a concept, diffusers' learned-embeds layout."""
    embedding = encoder.get_input_embeddings()
    added = tokenizer.get_added_vocab()
    tokens = [t for t in concept_tokens(token, len(added) + 1) if t in added]
    if not tokens or not isinstance(embedding, ExtendedEmbedding):
        raise ValueError(f"no learned embedding for {token!r}: it was not added with add_concept")
    rows = torch.tensor([added[t] for t in tokens]) - embedding.base.num_embeddings
    return {token: embedding.new.detach()[rows].float().contiguous().cpu()}


def save_learned_embeds(path: str | Path, tokenizer: Any, encoder: nn.Module, token: str) -> Path:
    """`learned_embeds.safetensors` for `pipe.load_textual_inversion(path)`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(learned_embeds(tokenizer, encoder, token), str(path), metadata={"format": "pt"})
    return path


def load_learned_embeds(path: str | Path, tokenizer: Any, encoder: nn.Module, token: str | None = None) -> list[str]:
    """Add the concept of a diffusers learned-embeds file (safetensors or .bin), frozen; `token` renames it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding={path} not found: give a learned_embeds.safetensors written by "
                                "finetune=textual_inversion (export/) or by diffusers' textual_inversion.py")
    state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    if "string_to_param" in state:  # A1111's .pt layout
        state = {state.get("name", token or "<concept>"): next(iter(state["string_to_param"].values()))}
    if len(state) != 1:
        raise ValueError(f"embedding file {path.name} holds {len(state)} tensors {sorted(state)[:3]}: a "
                         "learned-embeds file holds one {token: embedding}")
    name, vectors = next(iter(state.items()))
    vectors = vectors.reshape(-1, vectors.shape[-1])
    tokens = add_concept(tokenizer, encoder, token or name, vectors)
    encoder.get_input_embeddings().requires_grad_(False)
    return tokens
