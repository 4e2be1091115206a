# IResNet-50 on WebFace42M, CosFace, Partial FC 0.2, 8 GPUs x 512.
# Seed row: [000 multi-host] WF42M-PFC-0.2 | r50(512*8) | MFR-ALL 93.83 | IJB-C(1E-4) 97.53 | IJB-C(1E-5) 96.16 | Throughput ~5900
# Dataset: WebFace42M, 2,059,906 identities, 42,474,557 images; rec is a placeholder path.
# GPUs: 8 (one host); global batch 8 x 512 = 4,096.
# Launch: torchrun --nproc_per_node=8 -m partialfc.train configs/wf42m_pfc02_8gpus_r50_bs4k.py
#     or: horovodrun -np 8 -H localhost:8 bash config.sh configs/wf42m_pfc02_8gpus_r50_bs4k.py
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.network = 'r50'
config.resume = False
config.output = None  # work_dirs/wf42m_pfc02_8gpus_r50_bs4k
config.embedding_size = 512
config.sample_rate = 0.2
config.interclass_filtering_threshold = 0
config.fp16 = True
config.optimizer = 'sgd'
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 512  # per GPU
config.lr = 0.4
config.verbose = 10000

config.rec = '/train_tmp/WebFace42M'
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 20
config.warmup_epoch = 2
config.val_targets = ['lfw', 'cfp_fp', 'agedb_30']
