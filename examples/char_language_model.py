"""A character-level LSTM language model written for torch.nn.LSTM, made a BN-LSTM by one changed line.

Trains for about a minute on a bundled Shakespeare excerpt (`shakespeare.txt`: the first 200 KB of the
tinyshakespeare file of Karpathy's char-rnn, lines from Shakespeare's plays, public domain), the way PyTorch's
examples/word_language_model trains: the text as B parallel streams, cut into pieces of `bptt` characters, the
state carried from piece to piece (truncated backpropagation). Then it estimates the batch-norm population
statistics, reports the validation perplexity, saves the whole model, reloads it with torch.load's default
(weights_only=True) and samples from it one character at a time.

    python examples/char_language_model.py                 # about a minute on a laptop CPU
    python examples/char_language_model.py --seconds 10    # a quick look

What is specific to batch norm (and harmless for torch.nn.LSTM, so the code runs with either layer):
- `make_rnn`: the one changed line.
- `LanguageModel.forward` passes `start_step`: BN keeps statistics per timestep, and a call that continues a
  sequence must say where it is in it (generation below; each training piece starts at step 0).
- `recurrent_bn.estimate_population_statistics(..., carry_state=True)` before evaluating: the paper's test-time
  statistics, gathered with the state carried across pieces as the model is evaluated.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import recurrent_bn

TEXT = Path(__file__).with_name("shakespeare.txt")


def make_rnn(embedding: int, hidden: int, layers: int, dropout: float, bptt: int) -> nn.Module:
    # return nn.LSTM(embedding, hidden, layers, dropout=dropout)            # the model as written for torch.nn
    return recurrent_bn.LSTM(embedding, hidden, layers, dropout=dropout, norm="bn", max_length=bptt)  # BN-LSTM


class LanguageModel(nn.Module):
    """Embedding, a recurrent layer, a linear decoder: (T, B) character ids to (T, B, vocabulary) logits."""

    def __init__(self, vocabulary: int, embedding: int, hidden: int, layers: int, dropout: float, bptt: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, embedding)
        self.drop = nn.Dropout(dropout)
        self.rnn = make_rnn(embedding, hidden, layers, dropout, bptt)
        self.decoder = nn.Linear(hidden, vocabulary)

    def forward(self, ids: Tensor, state=None, start_step: int = 0):
        x = self.drop(self.embed(ids))
        if isinstance(self.rnn, recurrent_bn.LSTM):  # per-timestep statistics: say where this call starts
            output, state = self.rnn(x, state, start_step=start_step)
        else:
            output, state = self.rnn(x, state)
        return self.decoder(self.drop(output)), state


def detach(state):
    """The carried state without its history: backpropagation stops at the start of each piece."""
    return tuple(s.detach() for s in state)


def streams(ids: Tensor, batch: int) -> Tensor:
    """The text as `batch` parallel streams, (length, batch): column b is one contiguous stretch of the text."""
    length = len(ids) // batch
    return ids[: length * batch].view(batch, length).t().contiguous()


def pieces(data: Tensor, bptt: int):
    """Consecutive (input, target) pieces of `bptt` steps, the target shifted by one character."""
    for start in range(0, data.shape[0] - 1, bptt):
        length = min(bptt, data.shape[0] - 1 - start)
        yield data[start : start + length], data[start + 1 : start + 1 + length]


@torch.no_grad()
def perplexity(model: LanguageModel, data: Tensor, bptt: int) -> float:
    model.eval()
    state, total, count = None, 0.0, 0
    for x, y in pieces(data, bptt):
        logits, state = model(x, state)
        total += nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return math.exp(total / count)


@torch.no_grad()
def sample(model: LanguageModel, prompt: Tensor, length: int, bptt: int, temperature: float = 0.8) -> list[int]:
    """`length` characters after `prompt`, one at a time, the state carried between calls.

    Each call is one step of one long sequence, so it passes the step's position to the layer: the model was
    trained on pieces of `bptt` steps with the state carried, so position n was normalized as step n % bptt. Without
    it every character would be normalized with step 0's statistics (the layer warns)."""
    model.eval()
    logits, state = model(prompt[:, None])
    out, position = [], len(prompt)
    for _ in range(length):
        probabilities = torch.softmax(logits[-1, 0] / temperature, -1)
        token = torch.multinomial(probabilities, 1)
        out.append(int(token))
        logits, state = model(token[:, None], state, start_step=position % bptt)
        position += 1
    return out


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    text = TEXT.read_text()
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    ids = torch.tensor([index[c] for c in text])
    split = int(0.9 * len(ids))
    train_data, valid_data = streams(ids[:split], args.batch), streams(ids[split:], 10)
    model = LanguageModel(len(alphabet), args.embedding, args.hidden, args.layers, args.dropout, args.bptt)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    start, step, epoch = time.monotonic(), 0, 0
    while time.monotonic() - start < args.seconds:
        model.train()
        state = None
        for x, y in pieces(train_data, args.bptt):
            if x.shape[0] < args.bptt:
                continue  # a short last piece would be normalized as the first steps of a full one: skip it
            logits, state = model(x, None if state is None else detach(state))
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            optimizer.step()
            step += 1
            if step % args.log_every == 0:
                print(f"epoch {epoch} step {step} loss {loss.item():.3f} ({time.monotonic() - start:.0f} s)")
            if time.monotonic() - start >= args.seconds:
                break
        epoch += 1

    # The paper's test-time statistics: one pass over training pieces, the state carried as in evaluation.
    estimation = [x for x, _ in pieces(train_data, args.bptt) if x.shape[0] == args.bptt][: args.estimation_pieces]
    recurrent_bn.estimate_population_statistics(model, estimation, carry_state=True)
    valid = perplexity(model, valid_data, args.bptt)
    print(f"valid perplexity {valid:.2f} after {step} steps (uniform: {len(alphabet)})")

    torch.save(model, args.save)
    # torch.load's default is weights_only=True: recurrent_bn's modules are registered as safe at import; this
    # script's own class and torch.nn's modules it holds are allowed here, as they would be for torch.nn.LSTM.
    with torch.serialization.safe_globals([LanguageModel, nn.Embedding, nn.Dropout, nn.Linear, nn.LSTM]):
        loaded = torch.load(args.save)
    reloaded = perplexity(loaded, valid_data, args.bptt)
    print(f"reloaded from {args.save}: valid perplexity {reloaded:.2f}")
    prompt = torch.tensor([index[c] for c in "ROMEO:\n"])
    torch.manual_seed(args.seed)
    text_out = "".join(alphabet[i] for i in sample(loaded, prompt, args.sample, args.bptt))
    print("sample:\n" + "ROMEO:\n" + text_out)
    return {"steps": step, "valid_perplexity": valid, "reloaded_perplexity": reloaded, "vocabulary": len(alphabet)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="training time budget")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--bptt", type=int, default=35, help="steps per piece (T_max of the batch norm)")
    parser.add_argument("--embedding", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--estimation-pieces", type=int, default=100)
    parser.add_argument("--sample", type=int, default=300, help="characters to generate")
    parser.add_argument("--save", type=Path, default=Path("char_lm.pt"))
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    train(parse())
