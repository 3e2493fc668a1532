"""Run one training job from a JSON file of TrainOptions fields; tests/test_train.py starts it under torchrun."""

import json
import sys

import torch

from pegasus_x.training import TrainOptions, train

if __name__ == "__main__":
    torch.set_num_threads(1)
    options = json.loads(open(sys.argv[1], encoding="utf-8").read())
    train(TrainOptions(**options))
