"""The expensive preparation (SAE / linear-probe / reference embeddings, the zero-shot head) split over processes,
gathered in order, and cached under `output_dir/cache/` with keys that tell a stale cache from a valid one.

The 2-process runs are real: `torchrun --nproc_per_node 2` with gloo on the CPU, on an odd number of images (25)
and classes (5), so the shards are uneven. Each rank counts the rows its own forwards saw: a rank must encode only
its block (whole batches of 4: 16 / 9 images; a 2-shard stream 13 / 12; 3 / 2 classes), and the gathered result must be the 1-process result in the same order.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import textwrap
from pathlib import Path
from unittest import mock

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import TEMPLATES, make_tiny_clip, torchrun
from saeft_hf.cache import cache_dir, load_cached_tensors, save_cached_tensors
from saeft_hf.data import BorderCrop, transforms_from_pretrained, with_image_transform
from saeft_hf.distributed import shard_range
from saeft_hf.embeddings import add_reference_embeddings, compute_embeddings
from saeft_hf.hub import push_run_to_hub
from saeft_hf.pipeline import ModelArguments, build_model, sae_training_embeddings
from saeft_hf.zeroshot import from_clip, zeroshot_text_embeddings

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 25  # odd: the two ranks take 13 and 12
CLASSES5 = ["goldfish", "tabby cat", "red fox", "school bus", "cat"]  # odd: 3 and 2 (words in the tiny vocabulary)

# Runs on each torchrun rank: the sharded passes, with forward hooks counting the rows this rank encoded.
WORKER = textwrap.dedent("""
    import json, os, sys
    import datasets, torch, torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, CLIPModel
    from saeft_hf.data import BorderCrop, transforms_from_pretrained, with_image_transform
    from saeft_hf.distributed import gather_rows
    from saeft_hf.embeddings import add_reference_embeddings, compute_embeddings
    from saeft_hf.zeroshot import from_clip, zeroshot_text_embeddings

    clip_dir, data_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
    classes, templates = json.loads(sys.argv[4]), json.loads(sys.argv[5])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ds = datasets.load_from_disk(data_dir)
    _, tf = transforms_from_pretrained(clip_dir)
    model = from_clip(clip_dir, classes, templates, progress=False)
    seen = {"images": 0, "reference_images": 0, "texts": 0}
    key = ["images"]
    model.vision_model.register_forward_hook(lambda m, a, kw, o: seen.__setitem__(key[0], seen[key[0]] + kw["pixel_values"].shape[0]), with_kwargs=True)
    emb, labels = compute_embeddings(model, with_image_transform(ds, tf), batch_size=4, return_labels=True,
                                     distributed=True, progress=False)
    key[0] = "reference_images"
    z0 = add_reference_embeddings(ds, model, tf, batch_size=4, distributed=True, progress=False)["z0"]
    key[0] = "stream_images"
    seen["stream_images"] = 0
    stream = with_image_transform(ds.to_iterable_dataset(num_shards=2), tf)  # one shard per rank
    stream_emb = compute_embeddings(model, stream, batch_size=4, distributed=True, progress=False)
    clip = CLIPModel.from_pretrained(clip_dir)
    tok = AutoTokenizer.from_pretrained(clip_dir)
    clip.text_model.register_forward_hook(lambda m, a, kw, o: seen.__setitem__("texts", seen["texts"] + kw["input_ids"].shape[0]), with_kwargs=True)
    text = zeroshot_text_embeddings(clip, tok, classes, templates, distributed=True, progress=False)
    # A rank with no rows at all (more ranks than rows) is fine: the other's rows come back alone.
    lonely = gather_rows(torch.arange(6.0).reshape(3, 2) if rank == 1 else None)
    with open(os.path.join(out, f"seen{rank}.json"), "w") as fh:
        json.dump(seen, fh)
    if rank == 0:
        save_file({"emb": emb, "labels": labels, "z0": torch.as_tensor(z0), "text": text, "lonely": lonely,
                   "stream_emb": stream_emb},
                  os.path.join(out, "rank0.safetensors"))
    dist.barrier()
    dist.destroy_process_group()
""")


def image_dataset(n: int, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)) for _ in range(n)]
    return datasets.Dataset.from_dict({"image": images, "label": [i % 5 for i in range(n)]},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "label": datasets.Value("int64")}))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    clip = make_tiny_clip(tmp / "clip", classnames=CLASSES5)
    image_dataset(N_IMAGES).save_to_disk(tmp / "data")
    return tmp, clip


def test_shard_range_partitions_in_rank_order():
    for n in (0, 1, 5, 25, 26):
        for world in (1, 2, 3, 8):
            blocks = [shard_range(n, r, world) for r in range(world)]
            assert [i for b in blocks for i in b] == list(range(n))  # no gap, no duplicate, in order
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_two_processes_encode_half_each_and_gather_the_one_process_result(workspace):
    tmp, clip = workspace
    out = tmp / "ddp"
    out.mkdir()
    (tmp / "worker.py").write_text(WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [*torchrun(2),
           str(tmp / "worker.py"), str(clip), str(tmp / "data"), str(out), json.dumps(CLASSES5), json.dumps(TEMPLATES)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # Each rank encoded only its own block of whole batches of 4: 7 batches -> 4 + 3, i.e. 16 + 9 images (twice:
    # SAE-style and reference pass); 3 + 2 classes.
    seen = [json.loads((out / f"seen{r}.json").read_text()) for r in (0, 1)]
    assert [s["images"] for s in seen] == [16, 9]
    assert [s["reference_images"] for s in seen] == [16, 9]
    assert [s["stream_images"] for s in seen] == [13, 12]  # a stream: whole shards per rank, no row read twice
    assert [s["texts"] for s in seen] == [3 * len(TEMPLATES), 2 * len(TEMPLATES)]

    # The same rows, in the same order, as one process, and from the same batches (whole batches per rank). Not
    # asserted bitwise: the ranks run with one thread (torchrun) and this process with two, and CPU kernels may
    # split their sums by thread count; float32 rounding over a 32-wide tiny CLIP stays far below 1e-5 on
    # embeddings of norm ~1-10.
    got = load_file(out / "rank0.safetensors")
    ds = datasets.load_from_disk(str(tmp / "data"))
    _, tf = transforms_from_pretrained(str(clip))
    model = from_clip(str(clip), CLASSES5, TEMPLATES, progress=False)
    ref, ref_labels = compute_embeddings(model, with_image_transform(ds, tf), batch_size=4, return_labels=True,
                                         progress=False)
    assert got["emb"].shape == ref.shape == (N_IMAGES, 16)
    torch.testing.assert_close(got["emb"], ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(got["labels"], ref_labels)  # labels are exact: order proven row by row
    ref_z0 = torch.as_tensor(add_reference_embeddings(ds, model, tf, batch_size=4, progress=False)["z0"])
    torch.testing.assert_close(got["z0"], ref_z0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["emb"], got["z0"], atol=1e-5, rtol=1e-5)  # both passes: same images, same order
    # A stream gathers rank-major: here rank 0 holds shard 0 (rows 0-12) and rank 1 shard 1, i.e. the stream's order.
    torch.testing.assert_close(got["stream_emb"], ref, atol=1e-5, rtol=1e-5)

    from transformers import AutoTokenizer, CLIPModel

    text = zeroshot_text_embeddings(CLIPModel.from_pretrained(clip), AutoTokenizer.from_pretrained(clip), CLASSES5,
                                    TEMPLATES, progress=False)
    assert got["text"].shape == (5, 16)
    torch.testing.assert_close(got["text"], text, atol=1e-6, rtol=1e-5)  # per class the same batch: rounding only
    assert torch.equal(got["lonely"], torch.arange(6.0).reshape(3, 2))


def _count_forwards(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_embedding_cache_is_reused_for_the_same_inputs_and_rebuilt_when_they_change(workspace, tmp_path, caplog):
    tmp, clip = workspace
    ds = datasets.load_from_disk(str(tmp / "data"))
    _, tf = transforms_from_pretrained(str(clip))
    model = from_clip(str(clip), CLASSES5, TEMPLATES, progress=False)
    margs = ModelArguments(model_name_or_path=str(clip), embedding_batch_size=8)
    out = str(tmp_path / "run")
    calls = _count_forwards(model.vision_model)
    caplog.set_level(logging.INFO, logger="saeft_hf.cache")

    first = sae_training_embeddings(model, ds, tf, margs, output_dir=out)
    assert calls[0] == 4 and (cache_dir(out) / "sae_embeddings.safetensors").is_file()
    again = sae_training_embeddings(model, ds, tf, margs, output_dir=out)
    assert calls[0] == 4 and torch.equal(again, first)  # same inputs: reused, no forward
    assert "Reusing the embeddings cache" in caplog.text

    # Other images, same count: rebuilt, and the log names the changed field.
    caplog.clear()
    other = datasets.concatenate_datasets([image_dataset(1, seed=9), ds.select(range(1, N_IMAGES))])
    rebuilt = sae_training_embeddings(model, other, tf, margs, output_dir=out)
    assert calls[0] == 8 and "Rebuilding the embeddings cache" in caplog.text and "data:" in caplog.text
    assert not torch.allclose(rebuilt[0], first[0]) and torch.equal(rebuilt[1:], first[1:])
    # Changed weights, precision or transform: rebuilt too.
    for change in ("weights", "dtype", "transform"):
        caplog.clear()
        m, t, dtype = model, tf, None
        if change == "weights":
            m = from_clip(str(clip), CLASSES5, TEMPLATES, progress=False)
            with torch.no_grad():
                m.visual_projection.weight.mul_(2)
        elif change == "dtype":
            dtype = torch.bfloat16
        else:
            t = BorderCrop(tf, 2)  # another eval view (an ImageNet-A-style border crop)
        sae_training_embeddings(m, other, t, margs, output_dir=out, autocast_dtype=dtype)
        assert f"{change}:" in caplog.text, (change, caplog.text)

    # A file from an older version (no key) or a truncated one is never trusted.
    path = cache_dir(out) / "sae_embeddings.safetensors"
    from safetensors.torch import save_file

    save_file({"embeddings": torch.zeros(N_IMAGES, 16), "labels": torch.zeros(N_IMAGES, dtype=torch.long)}, str(path))
    assert load_cached_tensors(path, {"any": 1}) is None
    path.write_bytes(path.read_bytes()[:100])
    assert load_cached_tensors(path, {"any": 1}) is None
    # A cache path without a key is refused: it could not tell stale data from valid data.
    with pytest.raises(ValueError, match="without a cache_key"):
        compute_embeddings(model, with_image_transform(ds, tf), cache_path=path, progress=False)


def test_zeroshot_head_is_cached_per_checkpoint_classes_and_templates(workspace, tmp_path, caplog):
    tmp, clip = workspace
    out = str(tmp_path / "run")
    margs = ModelArguments(model_name_or_path=str(clip))
    encoded = []
    original = zeroshot_text_embeddings

    def spy(*args, **kwargs):
        encoded.append(list(args[2]))
        return original(*args, **kwargs)

    caplog.set_level(logging.INFO, logger="saeft_hf.cache")
    with mock.patch("saeft_hf.zeroshot.zeroshot_text_embeddings", spy):
        first = build_model(margs, CLASSES5, TEMPLATES, output_dir=out)
        second = build_model(margs, CLASSES5, TEMPLATES, output_dir=out)  # a resume: no text pass
        assert len(encoded) == 1 and torch.equal(first.classifier.weight, second.classifier.weight)
        build_model(margs, CLASSES5, TEMPLATES[:1], output_dir=out)  # other templates: rebuilt
        assert len(encoded) == 2 and "templates:" in caplog.text
        build_model(margs, CLASSES5[:3], TEMPLATES[:1], output_dir=out)  # other classes: rebuilt
        assert len(encoded) == 3 and "classnames:" in caplog.text
        # One process, no output dir: as before, nothing written.
        plain = from_clip(str(clip), CLASSES5, TEMPLATES, progress=False)
    assert torch.equal(plain.classifier.weight, first.classifier.weight)
    assert sorted(p.name for p in cache_dir(out).iterdir()) == ["zeroshot_head.safetensors"]


def test_push_never_uploads_caches(tmp_path):
    """Only the Hub's network edge is faked; the real huggingface_hub filter applies our ignore patterns."""
    from huggingface_hub.utils import filter_repo_objects

    out = tmp_path / "run"
    files = ["model.safetensors", "config.json", "README.md", "eval_results.json", "sae/model.safetensors",
             "sae/config.json", "cache/sae_embeddings.safetensors", "cache/zeroshot_head.safetensors",
             "cache/reference_embeddings_train.safetensors", "cache/sub/anything.bin",
             "sae_embeddings.safetensors", "reference_embeddings_eval.safetensors", "checkpoint-2/model.safetensors"]
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    save_cached_tensors(out / "cache" / "linear_probe_features.safetensors", {"x": torch.zeros(2)}, {"k": 1})
    uploaded = {}

    def upload_folder(*, folder_path, ignore_patterns, **kwargs):
        root = Path(folder_path)
        paths = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        uploaded["files"] = sorted(filter_repo_objects(paths, ignore_patterns=ignore_patterns))
        return "https://huggingface.co/me/run/commit/1"

    with mock.patch("saeft_hf.hub.HfApi") as api_cls:
        api_cls.return_value.create_repo.return_value.repo_id = "me/run"
        api_cls.return_value.upload_folder.side_effect = upload_folder
        push_run_to_hub(out, "me/run")
    assert uploaded["files"] == ["README.md", "config.json", "eval_results.json", "model.safetensors",
                                 "sae/config.json", "sae/model.safetensors"]


def test_train_sae_recipe_under_torchrun_matches_one_process(workspace):
    """recipes/train_sae.py under torchrun: 2 ranks embed 11 + 10 images, rank 0 trains and saves the SAE, rank 1
    exits cleanly; embeddings and SAE match the same steps run in this (single) process."""
    tmp, clip = workspace
    from helpers import make_image_folder
    from saeft_hf.data import load_image_dataset
    from saeft_hf.modeling import SAEFTCLIPForImageClassification
    from saeft_hf.pipeline import train_sae_for_model

    make_image_folder(tmp / "folder", per_class=7, names=["a", "b", "c"])  # 21 images: uneven shards
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    flags = ["--sae_epochs", "3", "--sae_batch_size", "8", "--sae_k", "4", "--embedding_batch_size", "4"]
    cmd = [*torchrun(2),
           str(ROOT / "recipes" / "train_sae.py"), "--model_name_or_path", str(clip), "--train_dir",
           str(tmp / "folder"), "--output_dir", str(tmp / "sae2"), "--dataloader_num_workers", "0", "--use_cpu", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # The same steps on one process, in process.
    margs = ModelArguments(model_name_or_path=str(clip), sae_epochs=3, sae_batch_size=8, sae_k=4,
                           embedding_batch_size=4)
    dataset = load_image_dataset(train_dir=str(tmp / "folder"), split="train")
    model = SAEFTCLIPForImageClassification.from_pretrained(str(clip), num_labels=1, source_model=str(clip))
    _, tf = transforms_from_pretrained(str(clip))
    one = sae_training_embeddings(model, dataset, tf, margs, output_dir=str(tmp / "sae1"))
    sae = train_sae_for_model(model, dataset, tf, margs, seed=0, embeddings=one, device="cpu")

    two = load_file(tmp / "sae2" / "cache" / "sae_embeddings.safetensors")
    assert one.shape == (21, 16)
    torch.testing.assert_close(two["embeddings"], one, atol=1e-5, rtol=1e-5)  # batch-shape rounding only
    # The SAE: same data in the same order and seed; rounding-level input differences stay small after 3 epochs.
    w2 = load_file(tmp / "sae2" / "model.safetensors")
    for name, value in sae.state_dict().items():
        torch.testing.assert_close(w2[name], value, atol=1e-4, rtol=1e-3)


def test_stream_fingerprint_tells_sources_shuffles_and_counts_apart(workspace):
    from saeft_hf.cache import dataset_fingerprint

    tmp, _ = workspace
    ds = datasets.load_from_disk(str(tmp / "data"))
    other = image_dataset(N_IMAGES, seed=5)

    def fp(data, seed=0, n=10):
        return dataset_fingerprint(data.to_iterable_dataset(num_shards=2).shuffle(seed=seed, buffer_size=8).take(n))

    assert fp(ds) == fp(ds)  # same inputs: same key, so a resume reuses the cache
    assert len({fp(ds), fp(other), fp(ds, seed=1), fp(ds, n=11)}) == 4


def test_a_cache_that_cannot_be_written_does_not_stop_the_run(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")  # the cache's parent folder cannot be created: as on a read-only disk
    with caplog.at_level(logging.WARNING, logger="saeft_hf.cache"):
        save_cached_tensors(blocked / "cache" / "x.safetensors", {"x": torch.ones(2)}, {"k": 1})
    assert "Could not write the cache" in caplog.text and blocked.read_text() == "not a folder"
