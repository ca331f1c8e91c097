"""Captions next to an image folder or zip, for text-to-image training (Rombach et al. 2022).

Two layouts are read, first found wins:

- ``captions.jsonl``: one JSON object per line, ``{"file": "00000/img00000000.png", "text":
  "a cat"}`` or, as Hugging Face ``imagefolder``'s ``metadata.jsonl``, ``{"file_name": ...,
  "caption": ...}``;
- ``dataset.json`` (EDM's ``dataset_tool.py`` layout) with a ``captions`` key: either a mapping
  ``{"file": "text"}`` or a list of ``[file, text]`` pairs, like its ``labels``.

File names are relative POSIX paths from the root, as ``FolderDataset.fnames``; every image must
have a caption.
"""

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import yaml
from PIL import Image
from torch import Tensor

from cm.checkpoint import build
from cm.data.datasets import DigitsDataset, FolderDataset
from cm.errors import UserError

CAPTIONS_JSONL = "captions.jsonl"
FILE_KEYS, TEXT_KEYS = ("file", "file_name"), ("text", "caption")
MEMO = 1024  # encoded captions kept per dataset copy (77 x 768 float32 = 236 kB each)


def _pick(entry: dict, keys: tuple[str, ...], line: int) -> str:
    """The first of ``keys`` present in a ``captions.jsonl`` entry."""
    for key in keys:
        if key in entry:
            return str(entry[key])
    raise UserError(
        f"{CAPTIONS_JSONL} line {line} has none of the keys {', '.join(keys)}: write "
        '{"file": ..., "text": ...} per line.'
    )


def parse_captions(read: Callable[[str], bytes | None]) -> dict[str, str] | None:
    """File -> caption from ``captions.jsonl`` or ``dataset.json``'s ``captions``; None if absent.

    Args:
        read: returns the bytes of a file relative to the data root, or None when it is missing.
    """
    raw = read(CAPTIONS_JSONL)
    if raw is not None:
        table = {}
        for i, line in enumerate(raw.decode("utf-8").splitlines(), 1):
            if line.strip():
                entry = json.loads(line)
                table[_pick(entry, FILE_KEYS, i)] = _pick(entry, TEXT_KEYS, i)
    else:
        raw = read("dataset.json")
        entries = None if raw is None else json.loads(raw).get("captions")
        if entries is None:
            return None
        table = dict(entries.items() if isinstance(entries, dict) else entries)
    return {name.replace("\\", "/"): str(text) for name, text in table.items()}


def captions_for(
    read: Callable[[str], bytes | None], fnames: Sequence[str], where: str
) -> list[str]:
    """The caption of every file in ``fnames``; a clear error if there are none or some miss."""
    table = parse_captions(read)
    if table is None:
        raise FileNotFoundError(
            f'No captions in \'{where}\': add {CAPTIONS_JSONL} (one {{"file", "text"}} per line) '
            "or a captions mapping in dataset.json."
        )
    missing = [f for f in fnames if f not in table]
    if missing:
        raise UserError(
            f"The captions of '{where}' miss {len(missing)} image(s), e.g. '{missing[0]}': give "
            "every image a caption."
        )
    return [table[f] for f in fnames]


class CaptionFolderDataset(FolderDataset):
    """An EDM-layout image folder/zip with captions, for text-to-image models (Rombach et al. 2022).

    Item ``i`` is ``(image, caption)``; with a ``text_encoder`` (``cm.networks.text.TextEncoder``)
    it is ``(image, tokens [max_length, D])``, the cross-attention context that
    ``ADMUNet(context_dim=D)`` takes as ``labels``, so the training modules run unchanged. The
    encoder runs per item in the loading process (on the CPU); the last ``MEMO`` distinct
    captions are memoised, so sets with few distinct captions (e.g. one per class) encode each
    once; for large sets precompute the embeddings. ``label_dim`` is 0: captions are not
    class labels.

    Args:
        path: folder or ``.zip`` of images with ``captions.jsonl`` or ``dataset.json`` captions.
        resolution: expected image size; None accepts the first image's.
        flip: random horizontal flips.
        text_encoder: encodes each caption into its token embeddings; None yields the strings.
    """

    def __init__(
        self,
        path: str,
        resolution: int | None = None,
        flip: bool = False,
        text_encoder: Callable[[list[str]], Tensor] | None = None,
    ) -> None:
        super().__init__(path, resolution, flip, use_labels=False)
        self.captions = captions_for(self._read, self.fnames, self.path)
        self._close()
        self.text_encoder = text_encoder
        self._encoded: OrderedDict[str, Tensor] = OrderedDict()

    def encode(self, caption: str) -> Tensor:
        """The token embeddings of ``caption``, memoised (least recently used dropped)."""
        tokens = self._encoded.pop(caption, None)
        if tokens is None:
            tokens = self.text_encoder([caption])[0]
        self._encoded[caption] = tokens
        if len(self._encoded) > MEMO:
            self._encoded.popitem(last=False)
        return tokens

    def __getitem__(self, idx: int) -> tuple[Tensor, str | Tensor]:
        x, _ = super().__getitem__(idx)
        caption = self.captions[idx]
        if self.text_encoder is None:
            return x, caption
        return x, self.encode(caption)


def read_prompts(path: str) -> list[str]:
    """Prompts of a captions file: ``.jsonl`` (``text``/``caption`` per line) or one per line.

    Used for text-to-image ODE pairs, where seed ``s`` gets prompt ``s % len(prompts)``.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except OSError:
        raise FileNotFoundError(
            f"No captions file at '{path}': give a .jsonl with a text per line or a .txt with one "
            "prompt per line."
        ) from None
    lines = [line for line in lines if line]
    if path.endswith(".jsonl"):
        lines = [_pick(json.loads(line), TEXT_KEYS, i) for i, line in enumerate(lines, 1)]
    if not lines:
        raise UserError(f"The captions file '{path}' holds no prompts.")
    return lines


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_digit_captions(root: str, num: int | None = None) -> Path:
    """scikit-learn's 8x8 digits as a captioned EDM-layout folder, "a handwritten digit seven".

    The CPU-sized text-to-image dataset (``configs/edm_digits_text.yaml``): grayscale PNGs
    ``00000/img00000000.png`` and their captions in ``captions.jsonl``; returns ``root``.

    Args:
        root: the folder to write (created).
        num: write only the first ``num`` digits (None: all 1797).
    """
    digits, out = DigitsDataset(8), Path(root)
    lines = []
    for i in range(len(digits) if num is None else min(num, len(digits))):
        x, label = digits[i]
        name = f"{i // 1000:05d}/img{i:08d}.png"
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = ((x[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels, "L").save(out / name)
        text = f"a handwritten digit {DIGIT_WORDS[int(label.argmax())]}"
        lines.append(json.dumps({"file": name, "text": text}))
    (out / CAPTIONS_JSONL).write_text("\n".join(lines) + "\n")
    return out


def prompt_contexts(config: str, prompt: str) -> Callable[[Sequence[int]], Tensor]:
    """Seed -> text context ``[N, L, D]`` for sampling: seed ``s`` gets prompt ``s % #prompts``.

    Args:
        config: a YAML/JSON file with the encoder's ``class_path``/``init_args``, or a training
            config whose ``data.init_args.dataset.init_args.text_encoder`` is one (the
            teacher's own encoder; ``data.init_args.text_encoder`` in older configs).
        prompt: one prompt for every image, or ``@FILE``: a ``.txt`` (one prompt per line) or
            ``.jsonl`` captions file.
    """
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(
            f"Text encoder config '{config}' does not exist: give the training YAML (its "
            "data.init_args.dataset.init_args.text_encoder) or a file with the encoder's "
            "class_path and init_args."
        )
    spec = yaml.safe_load(path.read_text())
    if isinstance(spec, dict) and "class_path" not in spec:
        data = (spec.get("data") or {}).get("init_args") or {}
        dataset = data.get("dataset")
        source = (dataset.get("init_args") or {}) if isinstance(dataset, dict) else data
        spec = source.get("text_encoder")
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise UserError(
            f"'{config}' holds no text encoder: give a training config with "
            "data.init_args.dataset.init_args.text_encoder or a class_path/init_args file."
        )
    encoder = build(spec)
    prompts = read_prompts(prompt[1:]) if prompt.startswith("@") else [prompt]
    return lambda seeds: encoder([prompts[int(s) % len(prompts)] for s in seeds])
