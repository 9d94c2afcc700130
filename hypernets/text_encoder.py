"""An offline sentence encoder for captions (the ``[text]`` extra), for ``hypernets.conditional --condition text``.

The ``wordllama`` wheel ships a 32,000-token embedding table (256-d, fp16, distilled from Llama 2's
token embeddings) and its tokenizer inside the package, so nothing is downloaded. We read those two
files ourselves (``tokenizers`` and ``safetensors``) and embed a caption as the L2-normalised mean
of its tokens' embeddings (the start token included). Unlike the built-in bag-of-words encoder,
whose vocabulary is the training captions' words, this one knows words the training captions never
used ("crimson" lands nearer "red" than "blue").

    embeddings = embed_captions(["a red circle", "a blue square"])   # [2, 256] float32, unit rows
"""

from __future__ import annotations

import functools
import os

import numpy as np

from fields.cli import UserError

TEXT_ENCODER = "wordllama l2_supercat 256-d mean of token embeddings"
EMBEDDING_DIM = 256
WEIGHTS_FILE = os.path.join("weights", "l2_supercat_256.safetensors")
TOKENIZER_FILE = os.path.join("tokenizers", "l2_supercat_tokenizer_config.json")


@functools.lru_cache(maxsize=1)
def _load():
    """``(tokenizer, table [32000, 256] float32)`` from the installed ``wordllama`` package."""
    try:
        import wordllama
    except ImportError:
        raise UserError("--condition text needs the offline text encoder: pip install -e '.[text]' "
                        "(wordllama, whose wheel ships the embedding table)") from None
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    root = os.path.dirname(wordllama.__file__)
    paths = [os.path.join(root, WEIGHTS_FILE), os.path.join(root, TOKENIZER_FILE)]
    for path in paths:
        if not os.path.exists(path):
            raise UserError(f"the installed wordllama lacks {path}; reinstall the [text] extra")
    table = load_file(paths[0])["embedding.weight"].astype(np.float32)
    return Tokenizer.from_file(paths[1]), table


def embed_captions(captions: list[str]) -> np.ndarray:
    """Captions ``[N]`` -> unit-norm embeddings ``[N, EMBEDDING_DIM]`` float32 (an empty caption: zeros)."""
    tokenizer, table = _load()
    out = np.zeros((len(captions), table.shape[1]), np.float32)
    for row, encoding in enumerate(tokenizer.encode_batch([str(caption) for caption in captions])):
        ids = [index for index in encoding.ids if 0 <= index < len(table)]
        if ids:
            mean = table[ids].mean(axis=0)
            out[row] = mean / max(float(np.linalg.norm(mean)), 1e-12)
    return out
