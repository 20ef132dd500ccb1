"""Hub and loading safety.

Pushing to the Hub fails safely: local outputs stay as they were, and the token never reaches a log, a card, a results
file, a pickled `training_args.bin` or an error message (only the Hub's network edge, `HfApi`, is faked). Loading never
unpickles: the package has no `torch.load` without `weights_only=True` and no `trust_remote_code`, and a pickle in
place of an SAE is refused without being run (test_sae covers the plain `pytorch_model.bin` case).
"""

from __future__ import annotations

import ast
import hashlib
import logging
import pickle
import traceback
from pathlib import Path
from unittest import mock

import httpx2 as httpx  # the HTTP client huggingface_hub 2.x raises from
import pytest
import transformers
from huggingface_hub.errors import LocalTokenNotFoundError

from helpers import CLASSNAMES, TEMPLATES, make_image_folder, make_tiny_clip
from saeft_hf import SAEFTConfig
from saeft_hf.data import load_image_dataset
from saeft_hf.hub import push_run_to_hub
from saeft_hf.pipeline import ModelArguments, run_saeft
from saeft_hf.sae import PICKLE_NAMES, SAEConfig, SAELoadError, SparseAutoencoder, convert_pickle_to_safetensors

ROOT = Path(__file__).resolve().parents[1]

TOKEN = "hf_SuperSecretToken0123456789"


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def fake_run(root: Path) -> Path:
    (root / "sae").mkdir(parents=True)
    (root / "checkpoint-2").mkdir()
    for name in ("model.safetensors", "config.json", "README.md", "eval_results.json", "sae/model.safetensors",
                 "sae/config.json", "checkpoint-2/model.safetensors"):
        (root / name).write_text(f"contents of {name}")
    return root


def full_text(err: BaseException) -> str:
    return str(err) + "".join(traceback.format_exception(err))


@pytest.mark.parametrize(
    ("token", "failure", "where"),
    [
        (TOKEN, httpx.ConnectError("[Errno -3] Temporary failure in name resolution"), "upload_folder"),
        (None, LocalTokenNotFoundError("Token is required (`token=True`), but no token found."), "create_repo"),
        (TOKEN, OSError(f"401 Unauthorized for url https://huggingface.co/api/repos/create (Bearer {TOKEN})"),
         "create_repo"),
        # A token in another format (an old org token) is removed too, not only the hf_... pattern.
        ("api_org_0123456789abcdefXYZ", OSError("403 Forbidden: token api_org_0123456789abcdefXYZ is read-only"),
         "upload_folder"),
    ],
    ids=["network-error", "missing-token", "http-401", "org-token"],
)
def test_failed_push_keeps_outputs_and_hides_the_token(tmp_path, token, failure, where):
    out = fake_run(tmp_path / "run")
    before = snapshot(out)
    with mock.patch("saeft_hf.hub.HfApi") as api_cls:
        api = api_cls.return_value
        api.create_repo.return_value.repo_id = "me/run"
        getattr(api, where).side_effect = failure
        with pytest.raises(RuntimeError) as info:
            push_run_to_hub(out, "me/run", token=token)
    message = full_text(info.value)
    assert "Your local outputs are intact" in message and "hf auth login" in message
    assert f"hf upload me/run {out}" in message and type(failure).__name__ in message
    if token:
        assert token not in message
    assert snapshot(out) == before  # nothing written, moved or deleted locally


def test_full_run_with_a_failing_push_leaks_the_token_nowhere(tmp_path, caplog, capfd):
    clip = make_tiny_clip(tmp_path / "clip")
    folder = make_image_folder(tmp_path / "train", per_class=2, names=CLASSNAMES)
    train = load_image_dataset(train_dir=folder, split="train", cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = SAEFTConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                       warmup_steps=0, logging_steps=1, save_steps=1, use_cpu=True, report_to="none",
                       dataloader_num_workers=0, push_to_hub=True, hub_model_id="me/tiny-saeft", hub_token=TOKEN)
    assert TOKEN not in repr(args) and TOKEN not in str(args)
    margs = ModelArguments(model_name_or_path=str(clip), sae_epochs=1, sae_batch_size=8, sae_k=4)
    caplog.set_level(logging.DEBUG)
    transformers.logging.set_verbosity_debug()
    try:
        with mock.patch("saeft_hf.hub.HfApi") as api_cls:
            api_cls.return_value.create_repo.return_value.repo_id = "me/tiny-saeft"
            api_cls.return_value.upload_folder.side_effect = OSError(f"Connection reset (Authorization: {TOKEN})")
            with pytest.raises(RuntimeError) as info:
                run_saeft(margs, args, train_dataset=train, eval_dataset=None, classnames=CLASSNAMES,
                          templates=TEMPLATES)
    finally:
        transformers.logging.set_verbosity_warning()
    assert api_cls.call_args.kwargs["token"] == TOKEN  # the push itself still got the token
    # Every local output is there and loads.
    assert {"model.safetensors", "config.json", "README.md", "eval_results.json", "trainer_state.json",
            "sae/model.safetensors", "sae/config.json", "checkpoint-2/training_args.bin"} <= set(snapshot(out))
    # The token is nowhere: not in the error, the logs, the console, nor any file (card, results, the pickled
    # training_args.bin of the run and of every checkpoint).
    assert TOKEN not in full_text(info.value)
    assert TOKEN not in caplog.text
    captured = capfd.readouterr()
    assert TOKEN not in captured.out and TOKEN not in captured.err
    leaks = [name for name in snapshot(out) if TOKEN.encode() in (out / name).read_bytes()]
    assert not leaks, f"the token is written in {leaks}"


# ---------------------------------------------------------------------------------------------------------------------
# Safe loading
# ---------------------------------------------------------------------------------------------------------------------


def _sources() -> list[Path]:
    return sorted([*(ROOT / "saeft_hf").rglob("*.py"), *(ROOT / "recipes").rglob("*.py")])


def test_the_package_never_unpickles_nor_trusts_remote_code():
    assert len(_sources()) > 10
    torch_loads, problems = [], []
    for path in _sources():
        text = path.read_text()
        rel = path.relative_to(ROOT).as_posix()
        for banned in ("trust_remote_code", "allow_pickle=True", "pickle.load", "dill.load", "joblib.load",
                       "cloudpickle.load", "from torch import load"):
            if banned in text:
                problems.append(f"{rel}: {banned}")
        tree = ast.parse(text, filename=rel)
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                safe = any(kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
                           for kw in node.keywords)
                owner = next((f.name for f in functions if f.lineno <= node.lineno <= (f.end_lineno or 0)), "<module>")
                torch_loads.append((rel, owner, safe))
    assert not problems, problems
    # The one torch.load is the explicit, opt-in converter, and it refuses arbitrary objects.
    assert torch_loads == [("saeft_hf/sae.py", "convert_pickle_to_safetensors", True)], torch_loads


class _Payload:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_malicious_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"W_enc": _Payload(marker)})
    sae_dir = tmp_path / "sae"
    SparseAutoencoder(SAEConfig(d_in=4, d_sae=8, k=2)).save_pretrained(sae_dir)
    (sae_dir / "model.safetensors").unlink()
    for name in PICKLE_NAMES:  # every pickle name is found, named in the message, and left alone
        (sae_dir / name).write_bytes(payload)
    with pytest.raises(SAELoadError, match=r"refuses to load them.*convert_pickle_to_safetensors") as info:
        SparseAutoencoder.from_pretrained(sae_dir)
    assert all(name in str(info.value) for name in PICKLE_NAMES)
    (sae_dir / "model.safetensors").write_bytes(payload)  # a pickle renamed to .safetensors
    with pytest.raises(SAELoadError, match="The file is corrupted"):
        SparseAutoencoder.from_pretrained(sae_dir)
    # The converter is for trusted files, but even there weights_only=True refuses code.
    with pytest.raises(SAELoadError, match="as a plain state dict") as info:
        convert_pickle_to_safetensors(sae_dir / "pytorch_model.bin", tmp_path / "out", SAEConfig(d_in=4, d_sae=8, k=2))
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()
