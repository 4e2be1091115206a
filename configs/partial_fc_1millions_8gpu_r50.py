# Throughput: IResNet-50, 1 million identities, Partial FC, 8 GPUs x 128, random data.
# Seed row: [001 1M identities] Partial FC(Ours) | 8 | 1024 | Memory/M 8100 | Throughput img/sec 2780
# Dataset: random tensors (rec = 'random'), 1,000,000 identities, 1,000,000 samples per epoch.
# GPUs: 8 (one host); global batch 8 x 128 = 1,024.
# Launch: torchrun --nproc_per_node=8 -m partialfc.train configs/partial_fc_1millions_8gpu_r50.py
#     or: horovodrun -np 8 -H localhost:8 bash config.sh configs/partial_fc_1millions_8gpu_r50.py
# rec = 'random': random images and labels, no reading or decoding, since the throughput figures
# leave I/O out. num_image only sets the length of an epoch.
# The table does not give the sampling rate; 0.1 is Partial FC's default. Compare with
# model parallel (its other row: 2390 img/sec, 10408 MB) by adding sample_rate=1.0.
# Schedule of the MXNet '100w' setting: 32k updates, lr / 10 at 20k and 28k.
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.network = 'r50'
config.resume = False
config.output = None  # work_dirs/partial_fc_1millions_8gpu_r50
config.embedding_size = 512
config.sample_rate = 0.1
config.interclass_filtering_threshold = 0
config.fp16 = True
config.optimizer = 'sgd'
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128  # per GPU
config.lr = 0.1
config.lr_scheduler = 'step'
config.lr_steps = [20000, 28000]
config.max_steps = 32000
config.verbose = 2000

config.rec = 'random'
config.num_classes = 1000000
config.num_image = 1000000
config.num_epoch = 1
config.warmup_epoch = 0
config.val_targets = []
