# The embedded synthetic face-identity dataset with a small backbone: a CPU-sized end-to-end run.
# `bash run.sh` trains it on 2 local processes; a 2-core laptop finishes in a few minutes.
from easydict import EasyDict as edict

config = edict()
config.rec = "synthetic"
config.val_targets = ["synthetic_val"]
config.network = "small"
config.embedding_size = 128
config.margin_list = (1.0, 0.5, 0.0)
config.sample_rate = 1.0
config.batch_size = 64
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.num_epoch = 6
config.warmup_epoch = 0
config.num_workers = 1
config.frequent = 10
config.verbose = 200
config.fp16 = False
config.output = "work_dirs/synthetic"
