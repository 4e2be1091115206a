# IResNet-100 on Glint360K, CosFace.
# Seed row: [000 single-host] Glint360k | r100 | MFR-ALL 89.52 | IJB-C(1E-4) 97.55 | IJB-C(1E-5) 96.38
# Dataset: Glint360K, 360,232 identities, 17,091,657 images; rec is a placeholder path.
# GPUs: 8 (one host); global batch 8 x 128 = 1,024.
# Launch: torchrun --nproc_per_node=8 -m partialfc.train configs/glint360k_r100.py
#     or: horovodrun -np 8 -H localhost:8 bash config.sh configs/glint360k_r100.py
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.network = 'r100'
config.resume = False
config.output = None  # work_dirs/glint360k_r100
config.embedding_size = 512
config.sample_rate = 1.0
config.interclass_filtering_threshold = 0
config.fp16 = True
config.optimizer = 'sgd'
config.momentum = 0.9
config.weight_decay = 1e-4
config.batch_size = 128  # per GPU
config.lr = 0.1
config.verbose = 2000

config.rec = '/train_tmp/glint360k'
config.num_classes = 360232
config.num_image = 17091657
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ['lfw', 'cfp_fp', 'agedb_30']
