# IResNet-100 on WebFace42M, CosFace, positive class centers only, 32 GPUs x 512.
# Seed row: [000 multi-host] WF42M-PFC-0.0018 | r100(512*32) | MFR-ALL 93.08 | IJB-C(1E-4) 97.51 | IJB-C(1E-5) 95.88 | Throughput ~10000
# Dataset: WebFace42M, 2,059,906 identities, 42,474,557 images; rec is a placeholder path.
# GPUs: 32 (4 hosts x 8); global batch 32 x 512 = 16,384.
# Launch: horovodrun -np 32 -H ip1:8,ip2:8,ip3:8,ip4:8 bash config.sh configs/wf42m_pfc0008_32gpu_r100.py
#     or: torchrun --nnodes=4 --node_rank=K --nproc_per_node=8 --master_addr=ip1 --master_port=12581 -m partialfc.train configs/wf42m_pfc0008_32gpu_r100.py   # on each host K = 0..3
# arcface_torch runs this row with sample_rate = 0 (keep only the batch's positive centers); here the rate
# must be in (0, 1], and 0.0018 gives the same sampling: each rank's budget is ceil(0.0018 * 64,373) = 116
# centers while the 16,384-sample global batch brings about 510 positives per rank, and positives are always
# kept. The batch covers 16,384 / 2,059,906 = 0.8% of the classes, the '0008' of the file name.
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.network = 'r100'
config.resume = False
config.output = None  # work_dirs/wf42m_pfc0008_32gpu_r100
config.embedding_size = 512
config.sample_rate = 0.0018
config.interclass_filtering_threshold = 0
config.fp16 = True
config.optimizer = 'sgd'
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 512  # per GPU
config.lr = 0.4
config.verbose = 2000

config.rec = '/train_tmp/WebFace42M'
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 20
config.warmup_epoch = 2
config.val_targets = ['lfw', 'cfp_fp', 'agedb_30']
