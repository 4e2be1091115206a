# IResNet-50 on MS1MV2, ArcFace.
# Seed row: [000 single-host] MS1MV2 | r50 | MFR-ALL 75.13 | IJB-C(1E-4) 95.97 | IJB-C(1E-5) 94.07
# Dataset: MS1MV2 (faces_emore, MS1M-ArcFace), 85,742 identities, 5,822,653 images; rec is a placeholder path.
# GPUs: 8 (one host); global batch 8 x 128 = 1,024.
# Launch: torchrun --nproc_per_node=8 -m partialfc.train configs/ms1mv2_r50.py
#     or: horovodrun -np 8 -H localhost:8 bash config.sh configs/ms1mv2_r50.py
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)  # ArcFace
config.network = 'r50'
config.resume = False
config.output = None  # work_dirs/ms1mv2_r50
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

config.rec = '/train_tmp/faces_emore'
config.num_classes = 85742
config.num_image = 5822653
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ['lfw', 'cfp_fp', 'agedb_30']
