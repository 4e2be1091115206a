# Throughput: IResNet-50, 3 million identities, Partial FC 0.1, fp16, 8 GPUs x 128, random data.
# Seed row: [arcface_torch speed_benchmark.md] 3 million identities | r50(128*8) | Partial FC 0.1 5299 samples/sec | Model Parallel 2271 samples/sec
# Dataset: random tensors (rec = 'random'), 3,000,000 identities, 1,000,000 samples per epoch.
# GPUs: 8 (one host); global batch 8 x 128 = 1,024.
# Launch: torchrun --nproc_per_node=8 -m partialfc.train configs/3millions.py
#     or: horovodrun -np 8 -H localhost:8 bash config.sh configs/3millions.py
# rec = 'random': random images and labels, no reading or decoding, since the throughput figures
# leave I/O out. num_image only sets the length of an epoch.
# The benchmark seed 000 points to (docs/speed_benchmark.md): 8x V100 32GB, Partial FC 0.1 uses about 10.4 GB
# per GPU against 28.9-30.3 GB for model parallel; run model parallel with sample_rate=1.0.
# Seed 000's Partial FC 0.1 speed table (8x V100, samples/sec) is this config with num_classes=N:
# 125000: 5004 | 1400000: 4738 | 5500000: 3975 | 8000000: 3565 | 16000000: 2679 | 29000000: 1855.
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.network = 'r50'
config.resume = False
config.output = None  # work_dirs/3millions
config.embedding_size = 512
config.sample_rate = 0.1
config.interclass_filtering_threshold = 0
config.fp16 = True
config.optimizer = 'sgd'
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128  # per GPU
config.lr = 0.2
config.verbose = 2000

config.rec = 'random'
config.num_classes = 3000000
config.num_image = 1000000
config.num_epoch = 1
config.warmup_epoch = 0
config.val_targets = []
