"""Several SAEs, one per representation: matching them to a run's representations, saving and loading them.

A run that penalises one representation uses one `SparseAutoencoder`, saved as a plain SAE folder (`sae/config.json`,
`sae/model.safetensors`), exactly as before. A run that penalises several (`representation=
"hidden_states.-1.cls,hidden_states.-2.cls"`) uses one SAE per representation, saved one folder per representation,
named by its spec:

    sae/hidden_states.-1.cls/{config.json, model.safetensors, README.md}
    sae/hidden_states.-2.cls/{...}

Each SAE's config records the representation it was trained on (`SAEConfig.representation`), and it must equal its
folder's name. `load_sae_set` reads either layout (a local folder or a Hub repo: a multi-SAE repo has the same
subfolders) and refuses a set that does not match the requested representations: one missing, one extra, a single
SAE for several representations, or an SAE in the wrong folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .sae import CONFIG_NAME, SAELoadError, SAEMismatchError, SparseAutoencoder

SAESet = dict[str, SparseAutoencoder]  # representation spec -> its SAE, in the run's order of representations


def as_sae_set(sae: SparseAutoencoder | Mapping[str, SparseAutoencoder] | Sequence[SparseAutoencoder] | None,
               specs: Sequence[str]) -> SAESet | None:
    """The `sae=` argument of `run_saeft` / `SAEFTTrainer` as `{spec: SAE}` in the order of `specs`.

    Accepts one SAE (for one representation), a mapping `{spec: SAE}`, or a list of SAEs (each matched to a spec by
    the representation its config records). Raises `SAEMismatchError` when the SAEs and `specs` differ (one missing,
    one extra, two SAEs for one spec). Width, source model and weights are checked separately
    (`saeft_hf.validation.check_sae_set`).
    """
    if sae is None:
        return None
    specs = list(specs)
    if isinstance(sae, SparseAutoencoder):
        if len(specs) == 1:
            return {specs[0]: sae}  # its recorded representation is checked against specs[0] later, with widths
        raise SAEMismatchError(
            f"One SAE (trained on `{sae.config.representation}`) was given, but the run penalises {len(specs)} "
            f"representations {specs}: pass one SAE per representation, as {{spec: SAE}} or a list."
        )
    if isinstance(sae, Mapping):
        saes = dict(sae)
        bad = [k for k, v in saes.items() if not isinstance(v, SparseAutoencoder)]
        if bad:
            raise TypeError(f"The SAE mapping must hold SparseAutoencoder values; {bad} do not.")
    elif isinstance(sae, Sequence) and not isinstance(sae, (str, bytes)):
        saes = {}
        for item in sae:
            if not isinstance(item, SparseAutoencoder):
                raise TypeError(f"The list of SAEs must hold SparseAutoencoders, got a {type(item).__name__}.")
            spec = item.config.representation
            if spec in saes:
                raise SAEMismatchError(f"Two of the given SAEs were trained on `{spec}`; give one SAE per "
                                       f"representation of {specs}.")
            saes[spec] = item
    else:
        raise TypeError(f"sae must be a SparseAutoencoder, a {{spec: SAE}} mapping or a list of SAEs, got "
                        f"{type(sae).__name__}.")
    return match_sae_set(saes, specs, "The given SAEs")


def match_sae_set(saes: Mapping[str, SparseAutoencoder], specs: Sequence[str], where: str) -> SAESet:
    """`saes` ordered as `specs`, or `SAEMismatchError` naming the missing and extra representations."""
    specs = list(specs)
    missing, extra = [s for s in specs if s not in saes], sorted(set(saes) - set(specs))
    if missing or extra:
        parts = ([f"no SAE for {missing}"] if missing else []) + ([f"SAEs for {extra} that the run does not "
                                                                   "penalise"] if extra else [])
        raise SAEMismatchError(
            f"{where} do not match the run's representations {specs}: {' and '.join(parts)}. Give exactly one SAE per "
            "representation (train the missing ones on the pre-trained model's embeddings of that representation, "
            "or change --representation)."
        )
    return {s: saes[s] for s in specs}


def save_sae_set(saes: Mapping[str, SparseAutoencoder], directory: str | os.PathLike[str]) -> None:
    """Write one SAE as a plain SAE folder in `directory`, several as `directory/<spec>/` (see the module doc)."""
    if len(saes) == 1:
        next(iter(saes.values())).save_pretrained(directory)
        return
    for spec, sae in saes.items():
        if sae.config.representation != spec:
            raise SAEMismatchError(f"The SAE for `{spec}` was trained on `{sae.config.representation}`; refusing to "
                                   "save it under the wrong name.")
        sae.save_pretrained(Path(directory) / spec)


def saved_sae_specs(directory: str | os.PathLike[str]) -> list[str] | None:
    """The representations of a local multi-SAE folder (its subfolders holding an SAE config), or None when
    `directory` is a single SAE or not a folder."""
    directory = Path(directory)
    if not directory.is_dir() or (directory / CONFIG_NAME).is_file():
        return None
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file())


def load_sae_set(path: str | os.PathLike[str], specs: Sequence[str], **hub_kwargs: Any) -> SAESet:
    """The SAEs for `specs` from `path` (a local folder or a Hub repo id), in the order of `specs`.

    One spec: `path` is a plain SAE folder (as `SparseAutoencoder.from_pretrained`) or, locally, a multi-SAE folder
    holding exactly that spec. Several: `path/<spec>/` for each (a Hub repo: the same subfolders). A local folder must
    hold exactly the requested representations; each SAE's recorded representation must equal its folder's name.
    """
    specs, source = list(specs), str(path)
    found = saved_sae_specs(source)
    if not found and len(specs) == 1:
        # A plain SAE folder or repo (ours, SAELens or sparsify); a foreign SAE names no representation of ours, so
        # it is taken to read the run's.
        return {specs[0]: SparseAutoencoder.from_pretrained(source, default_representation=specs[0], **hub_kwargs)}
    if os.path.isdir(source):
        if found is None:
            recorded = SparseAutoencoder.from_pretrained(source).config.representation
            raise SAEMismatchError(
                f"{source} holds one SAE (trained on `{recorded}`), but the run penalises {len(specs)} representations "
                f"{specs}: give a folder with one SAE per representation, {source}/<spec>/ (as a run with several "
                "representations saves in output_dir/sae/)."
            )
        if not found:
            raise SAELoadError(f"No SAE at {source}: neither {CONFIG_NAME} nor subfolders "
                               f"<representation>/{CONFIG_NAME}.")
        match_sae_set(dict.fromkeys(found), specs, f"The SAEs in {source} (for {found})")
    saes: SAESet = {}
    for spec in specs:
        try:
            sae = SparseAutoencoder.from_pretrained(source, subfolder=spec, default_representation=spec, **hub_kwargs)
        except SAELoadError as err:
            raise SAELoadError(f"No usable SAE for `{spec}` in {source}/{spec}: {err}") from err
        if sae.config.representation != spec:
            raise SAEMismatchError(
                f"{source}/{spec} holds an SAE trained on `{sae.config.representation}`, not `{spec}`: each "
                "representation's SAE must sit in the folder of its own name."
            )
        saes[spec] = sae
    return saes
