"""Characters/s of D2L's own predict_ch8 (d2l 0.17.6) on a scratch RNN (h=512), for bench.py.

Runs inside the D2L reference environment (made by d2l_reference.sh), not rnnlm's.
Usage: python d2l_predict_speed.py NUM_CHARS DATA_DIR
Threads follow torch's default, as in the reference trainer. The d2l package imports
plotting and vision libraries it does not need for chapter 8: they are replaced by empty
modules. The RNN equations below are the book's scratch RNN.
"""

import importlib.machinery
import json
import sys
import time
import types

for name in ["torchvision", "torchvision.transforms", "PIL", "PIL.Image", "pandas", "requests",
             "IPython", "IPython.display", "matplotlib", "matplotlib.pyplot",
             "matplotlib_inline", "matplotlib_inline.backend_inline"]:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules[name] = module
for parent, child in [("PIL", "Image"), ("torchvision", "transforms"), ("IPython", "display"),
                      ("matplotlib", "pyplot"), ("matplotlib_inline", "backend_inline")]:
    setattr(sys.modules[parent], child, sys.modules[f"{parent}.{child}"])

import torch  # noqa: E402
from d2l import torch as d2l  # noqa: E402

num_chars, data_dir = int(sys.argv[1]), sys.argv[2]
original_download = d2l.download
d2l.download = lambda name, cache_dir=data_dir: original_download(name, cache_dir)
_, vocab = d2l.load_data_time_machine(32, 35)
V, H, device = len(vocab), 512, torch.device("cpu")


def params(vocab_size, hidden, dev):
    def normal(*shape):
        return torch.randn(*shape) * 0.01
    ps = [normal(vocab_size, hidden), normal(hidden, hidden), torch.zeros(hidden),
          normal(hidden, vocab_size), torch.zeros(vocab_size)]
    return [p.requires_grad_(True) for p in ps]  # as the book's get_params does


def begin(batch, hidden, dev):
    return (torch.zeros(batch, hidden),)


def forward(inputs, state, ps):
    w_xh, w_hh, b_h, w_hq, b_q = ps
    (h,) = state
    outputs = []
    for x in inputs:
        h = torch.tanh(x @ w_xh + h @ w_hh + b_h)
        outputs.append(h @ w_hq + b_q)
    return torch.cat(outputs, dim=0), (h,)


torch.manual_seed(0)
net = d2l.RNNModelScratch(V, H, device, params, begin, forward)
# As the book calls it (train_ch8 and the text after it): without torch.no_grad.
start = time.perf_counter()
text = d2l.predict_ch8("time traveller", num_chars, net, vocab, device)
seconds = time.perf_counter() - start
print(json.dumps({"chars": num_chars, "seconds": seconds, "chars_per_s": num_chars / seconds}))
