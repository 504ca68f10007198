"""Reading a training row's audio: datasets' decoder (torchcodec) against the stored cell read with
``trustser.audio.decode_audio`` (soundfile), side by side on the same clips, with a check that the
samples are identical. The trainers and ``read_rows`` take the second path (``undecoded_audio``).

    python benchmarks/audio_decoding.py outputs/cache/annotate-<key>/data --split reference --n 400
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="a saved DatasetDict with an Audio column")
    p.add_argument("--split", default="reference")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import datasets
    import torch

    from trustser.audio import decode_audio, undecoded_audio

    torch.set_num_threads(1)
    ds = datasets.load_from_disk(a.data)[a.split]
    idx = list(range(min(a.n, len(ds))))
    raw = undecoded_audio(ds)
    decode_audio(ds[0]["audio"]), decode_audio(raw[0]["audio"])  # warm both paths
    t = time.perf_counter()
    by_datasets = [decode_audio(ds[i]["audio"]) for i in idx]
    t_datasets = time.perf_counter() - t
    t = time.perf_counter()
    by_path = [decode_audio(raw[i]["audio"]) for i in idx]
    t_path = time.perf_counter() - t
    same = all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(by_datasets, by_path))
    out = {
        "clips": len(idx),
        "ms_per_clip_datasets_decoder": round(1000 * t_datasets / len(idx), 2),
        "ms_per_clip_decode_audio": round(1000 * t_path / len(idx), 2),
        "speedup": round(t_datasets / t_path, 2),
        "identical_samples": same,
    }
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
