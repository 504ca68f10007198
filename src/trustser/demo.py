"""A Gradio demo of a trained system: upload or record a clip, see the caption, the emotion
probabilities (bar chart), each descriptor with the CEM's confidence, and the trust score.
Recordings longer than the model's window are cut into speech segments (``long_audio="segment"``)
and shown as a table and a timeline.

``trustser demo MODEL_OR_OUTPUT_DIR`` serves it on 127.0.0.1; the same :func:`build_demo` is the
``app.py`` of a Hub Space (:func:`space_files`, ``trustser push --space``). The page loads nothing
from outside the server (system fonts, no analytics).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from .descriptors import SED_FIELDS

logger = logging.getLogger(__name__)

DEFAULT_PORT = 7860
EXAMPLES_PER_EMOTION = 1


# ------------------------------------------------------------------------------------------------
# example clips
# ------------------------------------------------------------------------------------------------
def example_clips(
    source: str | os.PathLike | None, *, split: str = "test", per_emotion: int = EXAMPLES_PER_EMOTION, limit: int = 8
) -> list[str]:
    """Example clips: from a synthetic/audiofolder corpus root (``per_emotion`` of each emotion of
    its ``split``), a trustser output directory (its corpus stage), or a folder of audio files."""
    if source is None:
        return []
    p = Path(source)
    corpus = _corpus_of_output_dir(p) or p
    meta = corpus / split / "metadata.csv"
    if not meta.is_file():
        found = sorted(corpus.glob("*/metadata.csv"))
        meta = found[0] if found else meta
    if meta.is_file():
        with open(meta, newline="") as f:
            rows = list(csv.DictReader(f))
        picked: dict[str, list[str]] = {}
        for r in rows:
            emo = r.get("emotion", "")
            if len(picked.setdefault(emo, [])) < per_emotion and (meta.parent / r["file_name"]).is_file():
                picked[emo].append(str(meta.parent / r["file_name"]))
        return [c for clips in picked.values() for c in clips][:limit]
    if p.is_dir() and not (p / "config.json").exists():
        from .explain import AUDIO_EXTENSIONS

        return sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS)[:limit]
    return []


def _corpus_of_output_dir(p: Path) -> Path | None:
    """The synthetic corpus a trustser output directory was trained on, if its stage is cached."""
    try:
        from .hub import find_run

        _, results = find_run(p)
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        return None
    for s in results.get("stages", []):
        if s.get("name") == "corpus" and (Path(s["path"]) / "corpus").is_dir():
            return Path(s["path"]) / "corpus"
    return None


# ------------------------------------------------------------------------------------------------
# what the page shows
# ------------------------------------------------------------------------------------------------
def _fmt(x) -> str:
    return "" if x is None else f"{x:.2f}"


def describe(results: Sequence[dict]) -> dict[str, Any]:
    """The page's values for one clip's explanation (one result) or a segmented recording's:
    ``caption``, ``probabilities`` ({label: p}; duration-weighted mean over segments),
    ``descriptors`` (rows [descriptor, value, confidence]), ``trust`` (text), ``segments`` (rows)."""
    ok = [r for r in results if not r.get("error")]
    if not ok:
        raise ValueError(results[0]["error"] if results else "nothing to explain")
    segmented = results[0].get("start") is not None
    if not segmented:
        r = ok[0]
        conf = r.get("confidence") or {}
        return {
            "caption": r.get("caption") or "",
            "probabilities": r.get("probabilities") or ({r["emotion"]: 1.0} if r.get("emotion") else {}),
            "descriptors": [[f, (r.get("descriptors") or {}).get(f) or "?", _fmt(conf.get(f))] for f in SED_FIELDS],
            "trust": _fmt(r.get("trust")) or "n/a (no CEM)",
            "segments": [],
        }
    weights = [r["end"] - r["start"] for r in ok]
    probs: dict[str, float] = {}
    for r, w in zip(ok, weights):
        for k, v in (r.get("probabilities") or {}).items():
            probs[k] = probs.get(k, 0.0) + w * v / sum(weights)
    trusts = [(r["trust"], w) for r, w in zip(ok, weights) if r.get("trust") is not None]
    rows = []
    for r in results:
        if r.get("error"):
            rows.append([_fmt(r.get("start")), _fmt(r.get("end")), "ERROR", "", "", *[""] * len(SED_FIELDS)])
            continue
        p = (r.get("probabilities") or {}).get(r.get("emotion"))
        rows.append(
            [
                _fmt(r["start"]),
                _fmt(r["end"]),
                r.get("emotion") or "?",
                _fmt(p),
                _fmt(r.get("trust")),
                *[(r.get("descriptors") or {}).get(f) or "?" for f in SED_FIELDS],
            ]
        )
    return {
        "caption": "\n".join(f"[{r['start']:.1f}-{r['end']:.1f} s] {r.get('caption') or ''}" for r in ok),
        "probabilities": probs,
        "descriptors": [],
        "trust": _fmt(sum(t * w for t, w in trusts) / sum(w for _, w in trusts)) if trusts else "n/a (no CEM)",
        "segments": rows,
    }


SEGMENT_HEADERS = ["start", "end", "emotion", "p", "trust", *SED_FIELDS]


def build_demo(model, *, examples: Sequence[str] | str | None = None, cem=None, device=None, title: str | None = None):
    """The Gradio app (``gr.Blocks``) for a model folder, Hub id or trustser output directory.
    ``examples``: clip paths, or a source for :func:`example_clips` (default: the output
    directory's own corpus, when it has one)."""
    import gradio as gr

    from .explain import ExplainableSerPipeline, load_explainer

    pipe = model if isinstance(model, ExplainableSerPipeline) else load_explainer(model, cem=cem, device=device)
    if examples is None or isinstance(examples, (str, os.PathLike)):
        examples = example_clips(
            examples if examples is not None else model if isinstance(model, (str, os.PathLike)) else None
        )
    window = pipe.max_seconds

    def run(path):
        if not path:
            raise gr.Error("upload or record a clip first")
        from .audio import TARGET_SR, load_audio

        try:
            wav = load_audio(path)
            long = bool(window) and wav.size / TARGET_SR > window
            item = {"array": wav, "sampling_rate": TARGET_SR, "path": Path(path).name}
            results = pipe(item, long_audio="segment") if long else [pipe(item)]
            shown = describe(results)
        except (ValueError, OSError) as exc:  # AudioError is a ValueError
            raise gr.Error(str(exc)) from exc
        timeline = None
        if shown["segments"]:
            import tempfile

            from .plots import plot_timeline

            timeline = str(plot_timeline(results, Path(tempfile.mkdtemp(prefix="trustser-demo-")) / "timeline.png"))
        return (
            shown["caption"],
            shown["probabilities"],
            shown["descriptors"],
            shown["trust"],
            shown["segments"],
            timeline,
        )

    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    name = title or f"trustser: explainable speech emotion recognition ({Path(str(pipe.model.name_or_path)).name})"
    with gr.Blocks(title=name, analytics_enabled=False) as demo:
        demo.theme = theme  # applied by launch() too; kept here so a Space's plain demo.launch() gets it
        gr.Markdown(
            f"## {name}\nUpload or record a clip{f' (up to {window:g} s; longer ones are cut into speech segments)' if window else ''}. "
            "The model writes a caption with the emotion and five speech emotion descriptors; the "
            "confidence model scores each descriptor, and the trust score is their mean."
        )
        with gr.Row():
            with gr.Column():
                audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Clip", elem_id="clip")
                button = gr.Button("Explain", variant="primary", elem_id="explain")
                if examples:
                    gr.Examples(examples=[[c] for c in examples], inputs=[audio], label="Examples (synthetic corpus)")
            with gr.Column():
                caption = gr.Textbox(label="Caption", lines=3, elem_id="caption")
                probs = gr.Label(
                    label="Emotion probabilities", num_top_classes=len(pipe.emotion_labels), elem_id="probabilities"
                )
                trust = gr.Textbox(label="Trust score (CEM)", elem_id="trust")
                descriptors = gr.Dataframe(
                    headers=["descriptor", "value", "confidence"],
                    label="Descriptors",
                    interactive=False,
                    elem_id="descriptors",
                )
        segments = gr.Dataframe(
            headers=SEGMENT_HEADERS, label="Segments (long recordings)", interactive=False, elem_id="segments"
        )
        timeline = gr.Image(label="Timeline", type="filepath", interactive=False, elem_id="timeline")
        button.click(run, inputs=[audio], outputs=[caption, probs, descriptors, trust, segments, timeline])
    demo._trustser_theme = theme
    return demo


def launch(
    model,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    examples=None,
    cem=None,
    device=None,
    block: bool = True,
):
    """Builds and serves the demo on ``host:port`` (loopback by default; no share link)."""
    demo = build_demo(model, examples=examples, cem=cem, device=device)
    demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        ssr_mode=False,
        theme=demo._trustser_theme,
        prevent_thread_lock=not block,
        quiet=False,
    )
    return demo


# ------------------------------------------------------------------------------------------------
# a Hub Space
# ------------------------------------------------------------------------------------------------
APP_PY = '''"""trustser demo Space for {model_id}: python app.py (Spaces runs it as is).
TRUSTSER_MODEL overrides the model (a Hub id or a local folder)."""
import os

from trustser.demo import build_demo

demo = build_demo(os.environ.get("TRUSTSER_MODEL", {model_id!r}), examples="examples")

if __name__ == "__main__":
    demo.launch(theme=demo._trustser_theme, ssr_mode=False)
'''


def space_files(
    dest: str | os.PathLike,
    model_id: str,
    *,
    examples: Sequence[str] = (),
    requirement: str = "trustser",
    wheel: str | os.PathLike | None = None,
    title: str | None = None,
) -> Path:
    """Writes a Gradio Space for ``model_id`` to ``dest`` (atomically): ``app.py``,
    ``requirements.txt`` (``requirement``, or ``wheel`` copied in and installed from the Space),
    ``README.md`` (Space card: sdk gradio, the model linked) and ``examples/``."""
    from .utils import atomic_directory

    with atomic_directory(dest) as tmp:
        (tmp / "app.py").write_text(APP_PY.format(model_id=model_id))
        if wheel is not None:
            shutil.copy2(wheel, tmp / Path(wheel).name)
            requirement = f"./{Path(wheel).name}"
        (tmp / "requirements.txt").write_text(f"{requirement}\n")
        (tmp / "examples").mkdir()
        for i, clip in enumerate(examples):
            shutil.copy2(clip, tmp / "examples" / f"{i:02d}-{Path(clip).name}")
        import gradio

        meta = {
            "title": title or f"trustser demo: {model_id.split('/')[-1]}",
            "emoji": "🗣️",
            "sdk": "gradio",
            "sdk_version": gradio.__version__,
            "app_file": "app.py",
            "models": [model_id],
            "tags": ["trustser", "speech-emotion-recognition", "explainable-ai"],
            "pinned": False,
        }
        import yaml

        (tmp / "README.md").write_text(
            "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n"
            f"Explained speech emotion recognition with [`{model_id}`](https://huggingface.co/{model_id}): "
            "upload or record a clip to see the caption, the emotion probabilities, each speech emotion "
            "descriptor with its confidence and the trust score. Made with `trustser push --space`.\n"
        )
    return Path(dest)


def push_space(
    space_id: str,
    model_id: str,
    api=None,
    *,
    examples: Sequence[str] = (),
    requirement: str = "trustser",
    wheel=None,
    private: bool = False,
    token: str | None = None,
) -> dict[str, Any]:
    """Creates/updates the Gradio Space ``space_id`` serving ``model_id`` (one commit). ``api``: an
    ``HfApi`` or anything with ``create_repo``/``upload_folder`` (tests use a local fake)."""
    import tempfile

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="trustser-space-") as tmp:
        folder = space_files(Path(tmp) / "space", model_id, examples=examples, requirement=requirement, wheel=wheel)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        repo = api.create_repo(repo_id=space_id, private=private, exist_ok=True, repo_type="space", space_sdk="gradio")
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=space_id,
            repo_type="space",
            commit_message=f"trustser: demo Space for {model_id}",
        )
    url = str(getattr(repo, "url", None) or repo or f"https://huggingface.co/spaces/{space_id}")
    return {"space_id": space_id, "url": url, "files": files, "commit": str(getattr(commit, "oid", "") or commit or "")}


__all__ = ["build_demo", "launch", "describe", "example_clips", "space_files", "push_space"]
