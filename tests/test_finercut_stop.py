"""FinerCut's --remove-params stop rule: the removal count nearest the requested parameter share
(greedy.StopRule.take), never a whole candidate past it when stopping one step earlier is closer."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import _BASE, tiny_tokenizer

import compresskit
from compresskit.depth.candidates import Candidate
from compresskit.depth.greedy import StopRule, greedy_search

TEXT = ("The quick brown fox jumps over the lazy dog. Four score and seven years ago our fathers brought forth on "
        "this continent a new nation, conceived in liberty. ") * 40


class _Adapter:
    num_blocks = 3


class _Replay:
    adapter = _Adapter()


class FixedScorer:
    """Distances fixed per candidate: the greedy order is known in advance (smallest first)."""

    def __init__(self, distances: dict[str, float]):
        self.replay, self.distances, self.block_runs = _Replay(), distances, 0

    def score(self, start, swaps):
        return self.distances[swaps["name"]]

    def refresh(self, start):
        pass

    def current(self):
        return 0.0


# greedy order a (10), b (30), c (10), d (50): the distances make it so
CANDIDATES = [Candidate(0, "attn", "a", 10), Candidate(0, "mlp", "b", 30), Candidate(1, "attn", "c", 10),
              Candidate(1, "mlp", "d", 50)]
DISTANCES = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}


def removed_by(stop: StopRule) -> tuple[list[str], dict | None]:
    result = greedy_search(FixedScorer(DISTANCES), CANDIDATES, stop, swaps_for=lambda c: {"name": c.name},
                           apply=lambda c: None)
    return [s.candidate.name for s in result.steps], result.declined


def old_rule(target: int) -> list[str]:
    """The rule before: remove in greedy order until at least ``target`` parameters are gone."""
    out, total = [], 0
    for c in sorted(CANDIDATES, key=lambda c: DISTANCES[c.name]):
        if total >= target:
            break
        out.append(c.name)
        total += c.params
    return out


@pytest.mark.parametrize("target,expected", [
    (22, ["a"]),                 # 10 (12 short) is nearer than 40 (18 over): the old rule overshot to 40
    (24, ["a"]),                 # 10 (14 short) vs 40 (16 over)
    (25, ["a", "b"]),            # tie: 10 is 15 short, 40 is 15 over -> remove (the request is met)
    (41, ["a", "b"]),            # 40 (1 short) vs 50 (9 over)
    (46, ["a", "b", "c"]),       # 50 (4 over) vs 40 (6 short)
    (60, ["a", "b", "c"]),       # 50 (10 short) vs 100 (40 over): the old rule overshot to 100
    (5, ["a"]),                  # the first removal is always made
    (10, ["a"]),                 # exactly met: stop
])
def test_stop_is_the_removal_count_nearest_the_request(target, expected):
    names, declined = removed_by(StopRule(params=target))
    assert names == expected
    removed = sum(c.params for c in CANDIDATES if c.name in names)
    order = old_rule(target)
    old = sum(c.params for c in CANDIDATES if c.name in order)
    assert abs(removed - target) <= abs(old - target)  # never worse than the old rule
    assert order[: len(names)] == names  # same greedy order, only the stop differs
    if declined is not None:
        assert declined["name"] == order[len(names)] and abs(removed + declined["params"] - target) > abs(removed - target)


def test_count_rule_is_unchanged():
    assert removed_by(StopRule(count=3))[0] == ["a", "b", "c"]


def test_old_rule_overshoots_where_the_new_one_does_not():
    assert old_rule(22) == ["a", "b"] and removed_by(StopRule(params=22))[0] == ["a"]
    assert old_rule(60) == ["a", "b", "c", "d"] and removed_by(StopRule(params=60))[0] == ["a", "b", "c"]


def test_remove_params_through_prune_records_requested_and_achieved(tmp_path):
    # tiny Llama, 4 blocks: an attention sublayer (q,k,v,o + input norm) holds 12352 parameters, an MLP
    # (gate, up, down + post-attention norm) 24640, a block 36992. Block 2's attention is dead, so it goes
    # first; the request is that attention plus 1000 parameters. Stopping there is 1000 short; any
    # second removal is >= 11352 over. The old rule ("until at least the request") removed two.
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**_BASE, "num_hidden_layers": 4})).eval()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
    block_params = sum(p.numel() for p in model.model.layers.parameters())
    attn = sum(p.numel() for p in model.model.layers[2].self_attn.parameters()) + 64
    assert (attn, block_params) == (12352, 4 * 36992)
    fraction = (attn + 1000) / block_params
    (tmp_path / "c.txt").write_text(TEXT)
    out = compresskit.prune(model, "finercut", tokenizer=tiny_tokenizer(), calib=f"file:{tmp_path / 'c.txt'}",
                            nsamples=2, seqlen=32, method_options={"remove_params": fraction}, device="cpu")
    d = out.manifest.method_details
    assert d["removed"] == 1 and d["order"][0]["name"] == "model.layers.2.self_attn"
    assert d["requested_param_fraction"] == fraction and d["requested_params"] == attn + 1000
    assert d["achieved_param_fraction"] == pytest.approx(attn / block_params)
    assert d["declined_next"] is not None and d["declined_next"]["params"] >= attn
    assert "nearest" in d["stop_rule"]
