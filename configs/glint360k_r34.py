# IResNet-34 on Glint360K, CosFace, Partial FC 0.1.
# Seed row: [arcface_torch earlier model zoo] Glint360k | r34-0.1 | IJB-C(1E-5) 95.16 | IJB-C(1E-4) 96.56
# Dataset: Glint360K, 360,232 identities, 17,091,657 images; rec is a placeholder path.
# GPUs: 8 (one host); global batch 8 x 128 = 1,024.
# Launch: torchrun --nproc_per_node=8 -m partialfc.train configs/glint360k_r34.py
#     or: horovodrun -np 8 -H localhost:8 bash config.sh configs/glint360k_r34.py
# That release scaled lr 0.1 per 512 samples (0.2 at 8 x 128) and divided it by 10 at fixed epochs;
# lr_steps below are those epochs as fractions of training.
# Epochs 7, 11, 14 and 17 of 20.
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.network = 'r34'
config.resume = False
config.output = None  # work_dirs/glint360k_r34
config.embedding_size = 512
config.sample_rate = 0.1
config.interclass_filtering_threshold = 0
config.fp16 = True
config.optimizer = 'sgd'
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128  # per GPU
config.lr = 0.2
config.lr_scheduler = 'step'
config.lr_steps = [0.35, 0.55, 0.7, 0.85]
config.verbose = 2000

config.rec = '/train_tmp/glint360k'
config.num_classes = 360232
config.num_image = 17091657
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ['lfw', 'cfp_fp', 'agedb_30']
