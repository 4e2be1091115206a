# IResNet-100 on WebFace42M, CosFace, Partial FC 0.2, 16 GPUs x 256: the name seed 000's two-node example uses (identical to wf42m_pfc02_16gpus_r100.py; despite the name, its lr is 0.3).
# Seed row: [000 multi-host] WF42M-PFC-0.2 | r100(256*16) | MFR-ALL 96.69 | IJB-C(1E-4) 97.85 | IJB-C(1E-5) 96.63 | Throughput ~5200
# Dataset: WebFace42M, 2,059,906 identities, 42,474,557 images; rec is a placeholder path.
# GPUs: 16 (2 hosts x 8); global batch 16 x 256 = 4,096.
# Launch: horovodrun -np 16 -H ip1:8,ip2:8 bash config.sh configs/webface42m_r100_lr01_pfc02_bs4k_16gpus.py
#     or: torchrun --nnodes=2 --node_rank=K --nproc_per_node=8 --master_addr=ip1 --master_port=12581 -m partialfc.train configs/webface42m_r100_lr01_pfc02_bs4k_16gpus.py   # on each host K = 0..1
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.network = 'r100'
config.resume = False
config.output = None  # work_dirs/webface42m_r100_lr01_pfc02_bs4k_16gpus
config.embedding_size = 512
config.sample_rate = 0.2
config.interclass_filtering_threshold = 0
config.fp16 = True
config.optimizer = 'sgd'
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 256  # per GPU
config.lr = 0.3
config.verbose = 2000

config.rec = '/train_tmp/WebFace42M'
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 20
config.warmup_epoch = 1
config.val_targets = ['lfw', 'cfp_fp', 'agedb_30']
