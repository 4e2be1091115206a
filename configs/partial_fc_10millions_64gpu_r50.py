# Throughput: IResNet-50, 10 million identities, Partial FC, 64 GPUs x 64, random data.
# Seed row: [001 10M identities] Partial FC(Ours) | 64 | 4096 | Memory/M 6722 | Throughput img/sec 12600
# Dataset: random tensors (rec = 'random'), 10,000,000 identities, 1,000,000 samples per epoch.
# GPUs: 64 (8 hosts x 8); global batch 64 x 64 = 4,096.
# Launch: horovodrun -np 64 -hostfile hosts bash config.sh configs/partial_fc_10millions_64gpu_r50.py   # hosts: 8 lines 'ipN slots=8'
#     or: torchrun --nnodes=8 --node_rank=K --nproc_per_node=8 --master_addr=ip1 --master_port=12581 -m partialfc.train configs/partial_fc_10millions_64gpu_r50.py   # on each host K = 0..7
# rec = 'random': random images and labels, no reading or decoding, since the throughput figures
# leave I/O out. num_image only sets the length of an epoch.
# The table does not give the sampling rate; 0.1 is Partial FC's default. Its model
# parallel row (64 GPUs, batch 2048: 4483 img/sec, 9684 MB) is sample_rate=1.0 batch_size=32.
# Schedule of the MXNet '1000w' setting: 32k updates, lr / 10 at 20k and 28k.
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.network = 'r50'
config.resume = False
config.output = None  # work_dirs/partial_fc_10millions_64gpu_r50
config.embedding_size = 512
config.sample_rate = 0.1
config.interclass_filtering_threshold = 0
config.fp16 = True
config.optimizer = 'sgd'
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 64  # per GPU
config.lr = 0.1
config.lr_scheduler = 'step'
config.lr_steps = [20000, 28000]
config.max_steps = 32000
config.verbose = 2000

config.rec = 'random'
config.num_classes = 10000000
config.num_image = 1000000
config.num_epoch = 1
config.warmup_epoch = 0
config.val_targets = []
