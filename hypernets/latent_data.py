"""Latent diffusion data: a trained weight autoencoder's latents as training data, its decoder for samples.

``python -m hypernets.diffusion --latents AE_WORKDIR`` trains the weight-space DiT on the latents that
``python -m hypernets.autoencoder`` wrote to ``AE_WORKDIR/latents`` instead of on field weights:

- the train / validation split is the autoencoder's own (the latents' ``split`` column), so the
  diffusion never trains on a field the autoencoder held out;
- each latent dimension is standardised with the mean and standard deviation of the training
  latents (stored in the latents' schema metadata by the autoencoder);
- the latent vector keeps the autoencoder's sections: the part produced by the ``hash`` encoder and
  the part produced by the ``mlp`` encoder (``section_latent_dims`` in the metadata) become the
  sections of a param map over the latent (``latent/hash``, ``latent/mlp``), so the DiT chunks each
  on its own and tells them apart with its section embedding, as it does for raw weights;
- samples are destandardised, decoded with the autoencoder (``load_autoencoder``) to raw field weights
  and written like the plain diffusion's samples (field kind, config, param map and image size of
  the autoencoder's training dataset), so ``hypernets.evaluate --samples W/samples`` reads them.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from fields.cli import UserError
from fields.weights import ParamEntry

LATENT_PREFIX = "latent/"
SPLIT_NAMES = ("train", "val")


@dataclasses.dataclass
class LatentSplit:
    """One split of the latents, standardised: what ``hypernets.diffusion`` trains on.

    Attributes:
        vectors: ``[N, D]`` float32 standardised latents.
        labels: ``[N]`` int32 class labels (-1: unknown).
        source_ids: ``[N]`` source of each row.
        param_map: the latent's layout, one section per autoencoder section.
    """

    vectors: np.ndarray
    labels: np.ndarray
    source_ids: list[str]
    param_map: list[ParamEntry]

    def __len__(self) -> int:
        return int(self.vectors.shape[0])


@dataclasses.dataclass
class LatentSource:
    """An autoencoder run's latents and the decoder back to fields.

    Attributes:
        workdir: the autoencoder's work directory (absolute).
        train, validation: the autoencoder's splits of its latents.
        mean, std: ``[D]`` float32 per-dimension standardisation (training latents).
        model: the ``TrainedAutoencoder`` (decodes latents to raw field weights).
        step: the autoencoder's training step the latents come from.
    """

    workdir: str
    train: LatentSplit
    validation: LatentSplit
    mean: np.ndarray
    std: np.ndarray
    model: object
    step: int

    @property
    def fields(self):
        """The description of the decoded fields (``field_kind``, ``field_config``, ``param_map``, ``metadata``):
        the autoencoder's ``DataInfo``."""
        return self.model.data_info

    def to_fields(self, vectors: np.ndarray) -> np.ndarray:
        """Standardised latents ``[n, D]`` -> raw field weights ``[n, P]`` float32."""
        latents = np.asarray(vectors, np.float32) * self.std + self.mean
        return self.model.decode_to_fields(latents)

    def record(self) -> dict:
        """What identifies the training data in a diffusion run's ``config.json``."""
        return {"workdir": self.workdir, "step": self.step, "latent_dim": int(self.mean.shape[0])}


def latent_param_map(section_dims: dict[str, int]) -> list[ParamEntry]:
    """A param map over a latent ``[D]``: one 1D entry ``latent/<section>`` per autoencoder section, in order."""
    entries, offset = [], 0
    for name, size in section_dims.items():
        entries.append(ParamEntry(f"{LATENT_PREFIX}{name}", (int(size),), offset, int(size), str(name)))
        offset += int(size)
    return entries


def _standardisation(metadata: dict, latents: np.ndarray, train_rows: np.ndarray, where: str):
    """``(mean [D], std [D])`` float32: the stored training statistics (computed when absent); a zero std becomes 1."""
    dim = latents.shape[1]
    mean, std = metadata.get("latent_mean"), metadata.get("latent_std")
    if mean is None or std is None or len(mean) != dim or len(std) != dim:
        mean, std = np.mean(latents[train_rows], axis=0), np.std(latents[train_rows], axis=0)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise UserError(f"{where}: non-finite latent statistics")
    return mean, np.where(std > 0, std, np.float32(1.0)).astype(np.float32)


def load_latent_source(workdir: str) -> LatentSource:
    """Reads a finished ``hypernets.autoencoder`` run: its latents (split, standardised) and its decoder.

    Raises:
        UserError: a missing folder, a folder that is not a finished autoencoder run, or latents
            that do not fit the autoencoder (different size or sections, bad split names).
    """
    from hypernets.autoencoder import LATENTS_DIRECTORY, load_autoencoder, read_latents
    from hypernets.datasets import _source_ids, label_column

    if not os.path.isdir(workdir):
        raise UserError(f"--latents: autoencoder work directory not found: {workdir}")
    model = load_autoencoder(workdir)[0]
    where = os.path.join(workdir, LATENTS_DIRECTORY)
    latents, columns, metadata = read_latents(where)
    section_dims = metadata.get("section_latent_dims")
    if latents.shape[1] != model.latent_size or section_dims != model.network.section_latent_dims:
        raise UserError(f"{where}: latents of size {latents.shape[1]} ({section_dims}) do not fit the autoencoder "
                        f"in {workdir} ({model.network.section_latent_dims}); rerun its command to rewrite them")
    if not len(latents):
        raise UserError(f"{where} holds no latents")
    if not np.all(np.isfinite(latents)):
        raise UserError(f"{where}: non-finite latents")
    splits = np.asarray(columns.get("split", ["train"] * len(latents)), dtype=object)
    unknown = sorted({str(name) for name in splits} - set(SPLIT_NAMES))
    if unknown:
        raise UserError(f"{where}: unknown split name(s) {', '.join(unknown)} (expected train or val)")
    train_rows, val_rows = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "val")
    if not len(train_rows):
        raise UserError(f"{where}: no training latents (every row is held out)")
    mean, std = _standardisation(metadata, latents, train_rows, where)
    labels = label_column(columns, len(latents))
    source_ids = _source_ids(columns, len(latents))
    param_map = latent_param_map(section_dims)
    standardised = (latents - mean) / std

    def split(rows: np.ndarray) -> LatentSplit:
        return LatentSplit(standardised[rows].astype(np.float32), labels[rows], [source_ids[row] for row in rows],
                           list(param_map))

    return LatentSource(os.path.abspath(workdir), split(train_rows), split(val_rows), mean, std, model,
                        int(metadata.get("step", -1)))
