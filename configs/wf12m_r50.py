# IResNet-50 on WebFace12M, CosFace.
# Seed row: none for r50; the recipe of [000 single-host] WF12M | r100 | MFR-ALL 94.69 | IJB-C(1E-4) 97.59 | IJB-C(1E-5) 95.97
# Dataset: WebFace12M, 617,970 identities, 12,720,066 images; rec is a placeholder path.
# GPUs: 8 (one host); global batch 8 x 128 = 1,024.
# Launch: torchrun --nproc_per_node=8 -m partialfc.train configs/wf12m_r50.py
#     or: horovodrun -np 8 -H localhost:8 bash config.sh configs/wf12m_r50.py
# No accuracy is reported for r50 on this dataset; arcface_torch ships this recipe.
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.network = 'r50'
config.resume = False
config.output = None  # work_dirs/wf12m_r50
config.embedding_size = 512
config.sample_rate = 1.0
config.interclass_filtering_threshold = 0
config.fp16 = True
config.optimizer = 'sgd'
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128  # per GPU
config.lr = 0.1
config.verbose = 2000

config.rec = '/train_tmp/WebFace12M'
config.num_classes = 617970
config.num_image = 12720066
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = []
