"""bench probe: the generated text (gap exactly K, recall positions, seeds), the recall score on
hand-made models (an oracle scores 1.0, a constant guess scores its key's share, a model that
forgets between windows falls to chance), the widths at equal parameters, the options, and the
real command end to end."""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
import torch
from torch import nn

from rnnlm import cli
from rnnlm.commands import bench as bench_command
from rnnlm.config import ConfigError
from rnnlm.data.corpus import tokenize
from rnnlm.models import build_model
from rnnlm.tools import probe as P


def segments_of(stream: P.Stream) -> list[str]:
    return [stream.text[s: s + stream.gap + P.EXTRA_PER_SEGMENT] for s in stream.starts]


# ---------------------------------------------------------------------------- the text


@pytest.mark.parametrize("gap", [1, 7, 64, 300])
def test_every_segment_is_key_exactly_k_fillers_marker_key(gap):
    stream = P.make_stream(gap, 50, seed=3, part="train")
    assert "".join(segments_of(stream)) == stream.text  # nothing else in the text
    for start, recall, segment in zip(stream.starts, stream.recalls, segments_of(stream)):
        assert re.fullmatch(rf"([a-h])[0-9]{{{gap}}}\?\1\n", segment), segment
        assert recall - start == gap + 2  # key, K fillers, marker, then the recall
        assert stream.text[recall] == stream.text[start] and stream.text[recall - 1] == "?"
    assert stream.keys == "".join(s[0] for s in segments_of(stream))


def test_the_training_text_opens_with_the_alphabet_so_the_vocabulary_is_complete():
    stream = P.make_stream(5, 1, seed=0, part="train", header=True)  # one segment: 2 digits
    head, rest = stream.text.split("\n", 1)
    assert head == P.ALPHABET and stream.starts[0] == len(head) + 1
    assert re.fullmatch(r"([a-h])[0-9]{5}\?\1\n", rest)
    _, vocab = tokenize(stream.text, "raw")  # what the trainer builds from the file
    assert len(vocab) == P.vocab_size() and set(P.ALPHABET) <= set(vocab.tokens)


def test_the_text_is_a_function_of_the_seed_and_heldout_comes_from_another_generator():
    a = P.make_stream(30, 200, seed=1, part="train")
    assert a.text == P.make_stream(30, 200, seed=1, part="train").text
    assert a.text != P.make_stream(30, 200, seed=2, part="train").text
    held = P.make_stream(30, 200, seed=1, part="heldout")
    assert held.text != a.text and held.keys != a.keys
    # not a shifted copy either: no held-out segment's 30 fillers appear in the training text
    assert not any(s[1:31] in a.text for s in segments_of(held))


def test_keys_and_fillers_are_drawn_uniformly():
    stream = P.make_stream(100, 4000, seed=0, part="train")
    keys = np.array([stream.keys.count(k) for k in P.KEYS]) / 4000
    assert np.abs(keys - 1 / 8).max() < 0.02
    fillers = "".join(s[1:101] for s in segments_of(stream))
    shares = np.array([fillers.count(d) for d in P.FILLER]) / len(fillers)
    assert np.abs(shares - 0.1).max() < 0.003
    # the filler is not periodic: a model cannot count its way through it
    assert len({s[1:101] for s in segments_of(stream)}) == 4000


def test_segments_fill_the_token_budget_and_the_gradient_share():
    assert P.segment_count(1000, 10) == 71  # 14 characters each
    assert P.gradient_share(10, 64) == 53 / 64
    assert P.gradient_share(30, 64) == 33 / 64
    assert P.gradient_share(62, 64) == 1 / 64
    assert P.gradient_share(63, 64) == 0 and P.gradient_share(3000, 64) == 0


# ---------------------------------------------------------------------------- the score


class Remembers(nn.Module):
    """Answers at the recall only: after the marker, the last key it has seen (its state, or
    nothing when `forget` drops the state at every call); everywhere else the newline."""

    def __init__(self, vocab, forget: bool = False, constant: str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # recall_accuracy asks a parameter's device
        self.size, self.forget, self.constant = len(vocab), forget, constant
        self.index = vocab.index

    def begin_state(self, batch: int):
        return (torch.full((batch,), self.index["\n"]),)

    def forward(self, tokens, state):
        last = self.begin_state(tokens.shape[0])[0] if self.forget else state[0].clone()
        keys = torch.tensor([self.index[k] for k in P.KEYS])
        out = torch.zeros(tokens.shape[1], tokens.shape[0], self.size)
        for t in range(tokens.shape[1]):
            x = tokens[:, t]
            last = torch.where(torch.isin(x, keys), x, last)
            answer = torch.full_like(x, self.index["\n"])
            if self.constant is not None:
                answer[:] = self.index[self.constant]
            else:
                answer = torch.where(x == self.index["?"], last, answer)
            out[t] = nn.functional.one_hot(answer, self.size).float()
        return out, (last,)


def vocab_and_lanes(gap: int, segments: int, lanes: int, seed: int = 0):
    _, vocab = tokenize(P.make_stream(gap, 1, seed, "train", header=True).text, "raw")
    held = P.make_stream(gap, segments, seed, "heldout")
    return vocab, held, P.heldout_lanes(held, vocab.encode, lanes)


def test_lanes_hold_whole_segments_and_every_recall_once():
    vocab, held, lanes = vocab_and_lanes(gap=9, segments=37, lanes=5)
    assert [len(lane.recalls) for lane in lanes] == [8, 8, 7, 7, 7]
    assert sum(len(lane.ids) for lane in lanes) == len(held.text)
    for lane in lanes:
        assert vocab.decode(lane.ids[:1]) in P.KEYS and vocab.decode(lane.ids[-1:]) == "\n"
        assert vocab.decode(lane.ids[lane.recalls - 1]) == "?" * len(lane.recalls)
    assert "".join(vocab.decode(lane.ids[lane.recalls]) for lane in lanes) == held.keys


@pytest.mark.parametrize("window", [5, 256])
def test_a_model_that_always_recalls_scores_one_across_windows_and_lanes(window):
    vocab, _, lanes = vocab_and_lanes(gap=40, segments=60, lanes=4)  # lanes of 15 and 14
    score = P.recall_accuracy(Remembers(vocab), lanes, window=window)
    assert (score.correct, score.total, score.accuracy) == (60, 60, 1.0)


def test_a_constant_guess_scores_its_keys_share_which_is_chance():
    vocab, held, lanes = vocab_and_lanes(gap=3, segments=4000, lanes=16)
    score = P.recall_accuracy(Remembers(vocab, constant="c"), lanes)
    assert score.total == 4000 and score.correct == held.keys.count("c")
    assert abs(score.accuracy - P.CHANCE) < 0.02


def test_the_state_is_carried_between_windows_and_a_forgetful_model_falls_to_chance():
    vocab, held, lanes = vocab_and_lanes(gap=50, segments=800, lanes=8)
    # windows of 20 never hold a key and its marker together: only the carried state helps
    forgets = P.recall_accuracy(Remembers(vocab, forget=True), lanes, window=20)
    assert forgets.correct == 0  # it answers the newline it starts every window with
    assert P.recall_accuracy(Remembers(vocab), lanes, window=20).accuracy == 1.0
    # with windows that hold whole segments it needs no carried state
    assert P.recall_accuracy(Remembers(vocab, forget=True), lanes, window=54 * 100).accuracy \
        == 1.0


def test_the_score_puts_a_model_back_in_the_mode_it_was_in():
    vocab, _, lanes = vocab_and_lanes(gap=3, segments=8, lanes=2)
    model = Remembers(vocab).train()
    P.recall_accuracy(model, lanes)
    assert model.training


# ---------------------------------------------------------------------------- the models


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru", "lru", "mingru"])
def test_each_kind_gets_the_width_closest_to_the_parameter_target(kind):
    cfg = P.run_config(P.Options(), kind, 1, None, P.Path("unused")).model
    width, params = P.width_for(cfg, P.vocab_size(), 40_000)
    counts = {w: P.parameter_count(P.replace(cfg, hidden_size=w), P.vocab_size())
              for w in (width - 1, width, width + 1)}
    assert params == counts[width]
    assert all(abs(params - 40_000) <= abs(c - 40_000) for c in counts.values())
    model = build_model(P.replace(cfg, hidden_size=width), P.vocab_size())
    assert sum(p.numel() for p in model.parameters()) == params


def test_each_run_trains_with_the_probes_settings_and_the_users_recipe(tmp_path):
    options = P.Options(window=32, seed=5, sets=("train.lr=0.01", "data.batch_size=8"))
    cfg = P.run_config(options, "gru", 77, tmp_path / "t.txt", tmp_path / "run")
    assert (cfg.model.kind, cfg.model.hidden_size, cfg.data.num_steps, cfg.seed) == \
        ("gru", 77, 32, 5)
    assert (cfg.data.iterator, cfg.train.truncation, cfg.data.preprocess, cfg.train.epochs) \
        == ("sequential", "regular", "raw", 1)
    assert (cfg.train.lr, cfg.data.batch_size, cfg.data.path) == (0.01, 8, str(tmp_path / "t.txt"))


@pytest.mark.parametrize("options, message", [
    (P.Options(kinds=("lstm", "nope")), "--kinds: unknown kind 'nope'"),
    (P.Options(kinds=("lstm", "lstm")), "--kinds repeats a value"),
    (P.Options(gaps=(10, 10)), "--gaps repeats a value"),
    (P.Options(gaps=(0, 10)), "--gaps must all be >= 1"),
    (P.Options(gaps=()), "--gaps needs at least one value"),
    (P.Options(window=1), "--window must be >= 2"),
    (P.Options(recalls=0), "--recalls must be >= 1"),
    (P.Options(gaps=(1000,), tokens=5000), "--tokens 5,000 holds fewer than 8 segments"),
    (P.Options(sets=("model.hidden_size=64",)), "--set model.hidden_size: use --params"),
    (P.Options(sets=("data.num_steps=8",)), "--set data.num_steps: use --window"),
    (P.Options(sets=("data={}",)), "--set data: the probe sets it"),
])
def test_bad_options_are_refused_in_one_line(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        P.check_options(options)


def parse_probe(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_command.add_arguments(parser)
    return parser.parse_args(["probe", *argv])


def test_the_commands_defaults_are_the_probes():
    args = parse_probe([])
    assert tuple(args.kinds) == P.DEFAULT_KINDS and tuple(args.gaps) == P.DEFAULT_GAPS
    assert (args.tokens, args.window, args.params, args.recalls, args.seed) == \
        (P.DEFAULT_TOKENS, P.DEFAULT_WINDOW, P.DEFAULT_PARAMS, P.DEFAULT_RECALLS, 0)


@pytest.mark.parametrize("argv, message", [
    (["--gaps", "0"], "error: --gaps must all be >= 1"),
    (["--kinds", "transformer"], "error: --kinds: unknown kind 'transformer'"),
    (["--set", "train.lr=fast"], "error: --set: train.lr must be a number"),
    (["--gaps", "ten"], "argument --gaps: invalid int value: 'ten'"),
])
def test_bad_input_to_the_command_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["bench", "probe", *argv])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_preset_options_before_probe_are_refused(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["bench", "--epochs", "3", "probe"])
    assert stopped.value.code == 2
    assert "do not apply to probe" in capsys.readouterr().err


# ---------------------------------------------------------------------------- end to end


def test_the_command_trains_every_kind_on_every_gap_and_writes_table_and_plot(tmp_path, capsys):
    page, figure = tmp_path / "probe.md", tmp_path / "probe.png"
    page.write_text("# Probe\n\nprose that stays\n")
    argv = ["bench", "probe", "--kinds", "lstm", "mingru", "--gaps", "3", "40", "--tokens",
            "3000", "--window", "16", "--params", "3000", "--recalls", "24", "--seed", "1",
            "--write", str(page), "--plot", str(figure)]
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 0
    out, err = capsys.readouterr()
    assert f"Command: `rnnlm bench probe {' '.join(argv[2:])}`." in out
    assert "| kind | width | params | K=3 | K=40 | train s/run |" in out
    for kind in ("lstm", "mingru"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {kind} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert 2500 <= int(cells[2].replace(",", "")) <= 3500  # about --params
        assert all(0 <= float(c) <= 1 for c in cells[3:5])
    assert "chance 1/8 = 0.125" in out and "window T = 16" in out
    assert "K=3 75%, K=40 0%" in out  # the share of recalls a gradient can reach
    assert len(re.findall(r"^\[\d/4\] K=", err, re.M)) == 4  # one progress line per run
    text = page.read_text()
    assert text.startswith("# Probe\n\nprose that stays\n") and "<!-- bench:probe:start -->" in text
    assert out.strip().splitlines()[0] in text
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
