"""Smoke run of what the library needs from each light dependency; run by test_packaging in a fresh venv.

Exits 0 and prints "ok" when the tokenizer, a safetensors round trip, batching (numpy), a tiny generate and
the progress bar (tqdm) all work with the installed versions.
"""

import sys
import tempfile

import torch

from pegasus_x import PegasusTokenizer, PegasusXConfig, PegasusXForConditionalGeneration
from pegasus_x.training.data import plan_batches

# The known PEGASUS vector (see test_tokenizer): a wrong pre-tokenizer or normalizer changes these ids.
tok = PegasusTokenizer.pegasus()
ids = tok("<mask_1> To ensure a <mask_2> flow of bank resolutions.")["input_ids"]
assert ids == [2, 413, 615, 114, 3, 1971, 113, 1679, 10710, 107, 1], ids
assert tok.decode(ids, skip_special_tokens=True) == "To ensure a flow of bank resolutions."

torch.manual_seed(0)
model = PegasusXForConditionalGeneration(PegasusXConfig.tiny()).eval()
with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    loaded = PegasusXForConditionalGeneration.from_pretrained(folder).eval()
for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
    assert torch.equal(a, b), name
out = loaded.generate(torch.tensor([[5, 6, 7, 1]]), max_new_tokens=4)
assert out.shape[0] == 1

batches = plan_batches([5, 3, 9, 2], [2, 2, 2, 2], batch_size=2, seed=1)
assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]

from tqdm.auto import tqdm  # noqa: E402  (the import is what is checked)

for _ in tqdm(range(2), file=sys.stderr, disable=True):
    pass
print("ok")
