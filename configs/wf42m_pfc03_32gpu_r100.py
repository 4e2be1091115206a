# IResNet-100 on WebFace42M, CosFace, Partial FC 0.3, 32 GPUs x 128.
# Seed row: [000 ViT] WF42M-PFC-0.3 | r100(128*32) | FLOPs 12.1 | MFR-ALL 96.69 | IJB-C(1E-4) 97.82 | IJB-C(1E-5) 96.45
# Dataset: WebFace42M, 2,059,906 identities, 42,474,557 images; rec is a placeholder path.
# GPUs: 32 (4 hosts x 8); global batch 32 x 128 = 4,096.
# Launch: horovodrun -np 32 -H ip1:8,ip2:8,ip3:8,ip4:8 bash config.sh configs/wf42m_pfc03_32gpu_r100.py
#     or: torchrun --nnodes=4 --node_rank=K --nproc_per_node=8 --master_addr=ip1 --master_port=12581 -m partialfc.train configs/wf42m_pfc03_32gpu_r100.py   # on each host K = 0..3
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.network = 'r100'
config.resume = False
config.output = None  # work_dirs/wf42m_pfc03_32gpu_r100
config.embedding_size = 512
config.sample_rate = 0.3
config.interclass_filtering_threshold = 0
config.fp16 = True
config.optimizer = 'sgd'
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128  # per GPU
config.lr = 0.4
config.verbose = 2000

config.rec = '/train_tmp/WebFace42M'
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 20
config.warmup_epoch = 2
config.val_targets = ['lfw', 'cfp_fp', 'agedb_30']
