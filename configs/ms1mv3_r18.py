# IResNet-18 on MS1MV3, ArcFace.
# Seed row: [arcface_torch earlier model zoo] MS1MV3 | r18 | IJB-C(1E-5) 92.07 | IJB-C(1E-4) 94.66
# Dataset: MS1MV3 (ms1m-retinaface-t1), 93,431 identities, 5,179,510 images; rec is a placeholder path.
# GPUs: 8 (one host); global batch 8 x 128 = 1,024.
# Launch: torchrun --nproc_per_node=8 -m partialfc.train configs/ms1mv3_r18.py
#     or: horovodrun -np 8 -H localhost:8 bash config.sh configs/ms1mv3_r18.py
# That release scaled lr 0.1 per 512 samples (0.2 at 8 x 128) and divided it by 10 at fixed epochs;
# lr_steps below are those epochs as fractions of training.
# Epochs 10, 16 and 21 of 25.
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)  # ArcFace
config.network = 'r18'
config.resume = False
config.output = None  # work_dirs/ms1mv3_r18
config.embedding_size = 512
config.sample_rate = 1.0
config.interclass_filtering_threshold = 0
config.fp16 = True
config.optimizer = 'sgd'
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128  # per GPU
config.lr = 0.2
config.lr_scheduler = 'step'
config.lr_steps = [0.4, 0.64, 0.84]
config.verbose = 2000

config.rec = '/train_tmp/ms1m-retinaface-t1'
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 25
config.warmup_epoch = 0
config.val_targets = ['lfw', 'cfp_fp', 'agedb_30']
