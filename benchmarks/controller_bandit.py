"""Can the controller's learning rule find the wrong labels when the reward and the inputs allow it?
(Issue 15.)

A bandit on a fixed reward table (``benchmarks/reward_signal.py --table``): each utterance's reward
for a rectification is the scorer's reward of the annotated caption plus the single-field gains of
the fields it changes (additive, so no SLM runs), less ``--modify-cost`` per modified field. The
controller is a stand-in for ``SedControllerModel``'s head without the audio: a tanh layer over the
speaker-relative prosody (``controller_speaker_context``) and the annotated labels, its retain bias
as the trainer's. Everything else is the trainer's own code: ``sample_policies`` (K policies,
``adjacent`` replacements), ``per_field_advantages`` or ``group_normalize``, the clipped surrogate,
the entropy bonus, ``controller_updates_per_step`` Adam updates, gradient clipping. It reports, per
field, the mean modify probability over all utterances, its AUC for "the label is wrong", and the
greedy controller's wrong labels fixed and right labels broken.

If the reward table carries the signal (``reward_signal.py``) and the inputs carry the information
(``--context-auc``) but this bandit does not learn, the learning rule is what fails, not the SLM.

    python benchmarks/reward_signal.py outputs/cache/annotate-<key>/data outputs/cache/pretrain-<key>/model \\
        --split train --table table.npz
    python benchmarks/controller_bandit.py table.npz --seeds 0,1,2 --modify-cost 0.02 --entropy-coef 0.02
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from trustser.descriptors import SED_FIELDS, SED_VOCAB
from trustser.evaluation import binary_auc
from trustser.models.sed_controller import SedControllerConfig, SedControllerModel
from trustser.models.sed_controller.modeling_sed_controller import (
    hold_fixed_fields,
    rectify_field_indices,
    sample_policies,
    sed_to_ids,
)
from trustser.trainers.rectify_objective import (
    action_log_probs,
    bernoulli_entropy,
    bernoulli_kl,
    best_response_loss,
    clipped_policy_loss,
    early_stopped_fit,
    group_normalize,
    hold_out_gains,
    per_field_advantages,
    single_field_gains,
    single_field_variants,
)


def load_table(path: str) -> dict:
    """The reward table as tensors: ``gain`` (N, 5, 5) reward change of setting field f to value v
    (0 for the annotated value), ``ids`` (N, 5) annotated value ids, ``wrong`` (N, 5), ``context``."""
    t = np.load(path)
    n = len(t["logp"])
    gain = torch.zeros(n, len(SED_FIELDS), max(len(v) for v in SED_VOCAB.values()))
    for i, changes in enumerate(t["changes"]):
        for j, change in enumerate(changes):
            f, v = str(change).split("=", 1)
            gain[i, SED_FIELDS.index(f), SED_VOCAB[f].index(v)] = float(t["logp"][i, 1 + j] - t["logp"][i, 0])
    annotated = [dict(zip(SED_FIELDS, map(str, row))) for row in t["annotated"]]
    return {
        "gain": gain,
        "ids": sed_to_ids(annotated),
        "wrong": torch.tensor(t["annotated"] != t["truth"]),
        "context": torch.tensor(t["context"], dtype=torch.float32),
    }


def one_hot_labels(ids: torch.Tensor) -> torch.Tensor:
    """(N, 15) the annotated labels (N, 5) one-hot, field after field: the stand-in's and the ceiling's input."""
    return torch.cat(
        [torch.nn.functional.one_hot(ids[:, j], len(SED_VOCAB[f])).float() for j, f in enumerate(SED_FIELDS)], 1
    )


def table_rewards(gain: torch.Tensor, ids: torch.Tensor, rectified: torch.Tensor) -> torch.Tensor:
    """(B, K) rewards of (B, K, 5) rectified label sets relative to the annotated ``ids`` (B, 5): the
    sum of the single-field gains (B, 5, V) of the fields they change."""
    rewards = torch.zeros(rectified.shape[:2])
    for j in range(rectified.shape[-1]):
        changed = rectified[..., j] != ids[:, None, j]
        rewards += torch.where(changed, torch.gather(gain[:, j], 1, rectified[..., j]), torch.zeros(()))
    return rewards


def train_bandit(
    table: dict,
    *,
    steps: int = 600,
    batch_size: int = 8,
    num_policies: int = 6,
    learning_rate: float = 1e-2,
    updates_per_step: int = 4,
    modify_cost: float = 0.0,
    entropy_coef: float = 0.0,
    retain_kl_coef: float = 0.0,
    advantage: str = "per_field",
    use_context: bool = True,
    hidden_size: int = 64,
    initial_retain_bias: float = 2.0,
    controller: str = "stand_in",
    rectify_fields: list[str] | None = None,
    embedding_size: int = 32,
    fit: str = "online",
    max_updates: int = 1000,
    seed: int = 0,
) -> dict:
    """Trains the controller on the table; per field: ``modify_probability``, ``modify_auc`` (for
    "wrong"), greedy ``fixed`` / ``broken``. ``controller="stand_in"``: a tanh layer over the
    context and one-hot labels; ``"model"``: the trainer's own ``SedControllerModel`` with
    ``reads_audio=False`` (learnt label embeddings, ``controller_input="none"``), so the only
    difference from the trainer left is the reward (this table's additive single-field gains
    instead of the SLM's reward of the joint rectification). ``rectify_fields``: the fields it may
    modify (``SedRectifyConfig.rectify_fields``; None = all five); ``embedding_size``: the model's
    label embedding width (``controller_embedding_size``). ``fit="table"`` (single-field credit only,
    as ``controller_fit="table"``): instead of ``steps`` online batches, full-batch updates on every
    utterance's gains, a seeded fifth held out for early stopping (``early_stopped_fit``)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    ids, gain, wrong = table["ids"], table["gain"], table["wrong"]
    n = len(ids)
    onehot = one_hot_labels(ids)
    context = table["context"] if use_context else torch.zeros_like(table["context"])
    x = torch.cat([context, onehot], 1)
    nf = len(SED_FIELDS)
    if controller == "model":
        model = SedControllerModel(
            SedControllerConfig(
                reads_audio=False,
                context_size=context.shape[1],
                head_hidden_size=hidden_size,
                initial_retain_bias=initial_retain_bias,
                rectify_fields=rectify_fields,
                embedding_size=embedding_size,
            )
        )
        silence = torch.zeros(1, 1, model.config.n_mels)

        def head(module, rows: torch.Tensor) -> torch.Tensor:
            return module(ids[rows], input_features=silence.expand(len(rows), 1, -1), context=context[rows]).logits

    elif controller == "stand_in":
        model = torch.nn.Sequential(
            torch.nn.Linear(x.shape[1], hidden_size), torch.nn.Tanh(), torch.nn.Linear(hidden_size, 2 * nf)
        )
        with torch.no_grad():  # retain-over-modify margin, as a new controller's
            model[2].bias.view(nf, 2)[:, 0] = initial_retain_bias
            model[2].bias.view(nf, 2)[:, 1] = 0.0

        def head(module, rows: torch.Tensor) -> torch.Tensor:
            return hold_fixed_fields(module(x[rows]).view(-1, nf, 2), rectify_fields)

    else:
        raise ValueError(f"controller must be 'stand_in' or 'model', got {controller!r}")
    fields = rectify_field_indices(rectify_fields)
    model.train()
    reference = copy.deepcopy(model)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=learning_rate)
    if fit == "table":
        if advantage != "single_field":
            raise ValueError(f"fit='table' fits the single-field gains; got advantage={advantage!r}")
        gains = single_field_gains(table_rewards(gain, ids, single_field_variants(ids, fields)), len(fields))
        fitted, heldout = hold_out_gains(gains, g)
        rows = torch.arange(n)

        def update() -> None:
            opt.zero_grad()
            logits = head(model, rows)
            loss = best_response_loss(logits, fitted, fields, modify_cost, entropy_coef)
            if retain_kl_coef:
                with torch.no_grad():
                    ref_logits = head(reference, rows)
                loss = loss + retain_kl_coef * bernoulli_kl(logits, ref_logits).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        @torch.no_grad()
        def heldout_loss() -> float:
            return float(best_response_loss(head(model, rows), heldout, fields, modify_cost, entropy_coef))

        early_stopped_fit(model, update, heldout_loss, max_updates)
        steps = 0
    elif fit != "online":
        raise ValueError(f"fit must be 'online' or 'table', got {fit!r}")
    order, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        b = order[pos : pos + batch_size]
        pos += batch_size
        with torch.no_grad():
            if advantage == "single_field":  # every one-field modification scored, no sampling
                gains = single_field_gains(
                    table_rewards(gain[b], ids[b], single_field_variants(ids[b], fields)), len(fields)
                )
            else:
                sample = sample_policies(head(model, b), ids[b], num_policies, generator=g, strategy="adjacent")
                rewards = table_rewards(gain[b], ids[b], sample.rectified_ids) - modify_cost * sample.actions.sum(-1)
                adv = (
                    per_field_advantages(rewards, sample.actions, scale="none")
                    if advantage == "per_field"
                    else group_normalize(rewards, scale="none")
                )
            ref_logits = head(reference, b)
        for _ in range(updates_per_step):
            opt.zero_grad()
            logits = head(model, b)
            if advantage == "single_field":  # the entropy bonus is in the best response's temperature
                loss = best_response_loss(logits, gains, fields, modify_cost, entropy_coef)
            else:
                loss, _ = clipped_policy_loss(action_log_probs(logits, sample.actions), sample.log_probs, adv, 0.2)
                loss = loss - entropy_coef * bernoulli_entropy(logits).mean()
            if retain_kl_coef:
                loss = loss + retain_kl_coef * bernoulli_kl(logits, ref_logits).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    with torch.no_grad():
        p = torch.softmax(head(model, torch.arange(n)), -1)[..., 1]
    out = {}
    for j, f in enumerate(SED_FIELDS):
        greedy, w = p[:, j] > 0.5, wrong[:, j]
        out[f] = {
            "modify_probability": round(float(p[:, j].mean()), 4),
            "modify_auc": round(binary_auc(p[:, j].numpy(), w.float().numpy()), 4),
            "fixed": int((greedy & w).sum()),
            "broken": int((greedy & ~w).sum()),
        }
    return out


def regression_ceiling(
    table: dict, rectify_fields: list[str] | None = None, costs=(0.0, 0.02, 0.05), seed: int = 0
) -> dict:
    """What a learner could reach from this reward and the controller's non-audio inputs: each
    field's single-field gain (the mean over its adjacent values, as ``advantage="single_field"``
    measures it) regressed on the speaker context and the one-hot labels by gradient-boosted trees,
    cross-fitted over 5 folds of the utterances; per field the AUC of the predicted gain for "the
    label is wrong" and the wrong labels fixed / right labels broken by "modify where the predicted
    gain exceeds the cost". A controller that learns the reward's rule cannot do much better."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.model_selection import KFold, cross_val_predict

    ids, wrong = table["ids"], table["wrong"].numpy()
    fields = rectify_field_indices(rectify_fields)
    gains = single_field_gains(table_rewards(table["gain"], ids, single_field_variants(ids, fields)), len(fields))
    x = torch.cat([table["context"], one_hot_labels(ids)], 1).numpy()
    folds = KFold(5, shuffle=True, random_state=seed)
    out = {}
    for i, j in enumerate(fields):
        model = HistGradientBoostingRegressor(max_depth=3, max_iter=100, random_state=seed)
        predicted = cross_val_predict(model, x, gains[:, i].numpy(), cv=folds)
        w = wrong[:, j]
        out[SED_FIELDS[j]] = {
            "gain_auc": round(binary_auc(gains[:, i].numpy(), w.astype(float)), 4),
            "predicted_gain_auc": round(binary_auc(predicted, w.astype(float)), 4),
            **{
                f"cost_{c}": {"fixed": int(((predicted > c) & w).sum()), "broken": int(((predicted > c) & ~w).sum())}
                for c in costs
            },
        }
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("table", help="a reward table from benchmarks/reward_signal.py --table")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--modify-cost", type=float, default=0.0)
    p.add_argument("--entropy-coef", type=float, default=0.0)
    p.add_argument("--retain-kl-coef", type=float, default=0.0)
    p.add_argument("--learning-rate", type=float, default=1e-2)
    p.add_argument("--num-policies", type=int, default=6, help="K, policies sampled per utterance")
    p.add_argument("--advantage", default="per_field", choices=("per_field", "group", "single_field"))
    p.add_argument("--no-context", action="store_true", help="the controller does not see the speaker context")
    p.add_argument("--controller", default="stand_in", choices=("stand_in", "model"))
    p.add_argument("--rectify-fields", default=None, help="comma-separated fields it may modify (default: all)")
    p.add_argument("--embedding-size", type=int, default=32, help="label embedding width of --controller model")
    p.add_argument(
        "--fit",
        default="online",
        choices=("online", "table"),
        help="'table': one early-stopped full-batch fit to every utterance's gains (controller_fit='table')",
    )
    p.add_argument("--json", default=None)
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="only the regression ceiling: cross-fitted trees predicting each field's single-field gain",
    )
    a = p.parse_args(argv)
    table = load_table(a.table)
    if a.ceiling:
        fields = a.rectify_fields.split(",") if a.rectify_fields else None
        report = {"ceiling": regression_ceiling(table, fields), "rectify_fields": fields}
        for f, r in report["ceiling"].items():
            print(f, json.dumps(r))
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
        return report
    settings = {
        "steps": a.steps,
        "modify_cost": a.modify_cost,
        "entropy_coef": a.entropy_coef,
        "retain_kl_coef": a.retain_kl_coef,
        "learning_rate": a.learning_rate,
        "num_policies": a.num_policies,
        "advantage": a.advantage,
        "use_context": not a.no_context,
        "controller": a.controller,
        "rectify_fields": a.rectify_fields.split(",") if a.rectify_fields else None,
        "embedding_size": a.embedding_size,
        "fit": a.fit,
    }
    runs = {}
    for seed in [int(s) for s in a.seeds.split(",")]:
        runs[seed] = train_bandit(table, seed=seed, **settings)
        print(
            f"seed {seed}: "
            + "  ".join(
                f"{f} p={r['modify_probability']:.2f} auc={r['modify_auc']:.2f} {r['fixed']}/{r['broken']}"
                for f, r in runs[seed].items()
            )
        )
    report = {"settings": settings, "runs": runs}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
