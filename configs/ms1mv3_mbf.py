# MobileFaceNet on MS1MV3, ArcFace.
# Seed row: [000 single-host] MS1MV3 | mobilefacenet-0.45G | MFR-ALL 63.78 | IJB-C(1E-4) 94.23 | IJB-C(1E-5) 91.33
# Dataset: MS1MV3 (ms1m-retinaface-t1), 93,431 identities, 5,179,510 images; rec is a placeholder path.
# GPUs: 8 (one host); global batch 8 x 128 = 1,024.
# Launch: torchrun --nproc_per_node=8 -m partialfc.train configs/ms1mv3_mbf.py
#     or: horovodrun -np 8 -H localhost:8 bash config.sh configs/ms1mv3_mbf.py
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)  # ArcFace
config.network = 'mbf'
config.resume = False
config.output = None  # work_dirs/ms1mv3_mbf
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

config.rec = '/train_tmp/ms1m-retinaface-t1'
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 40
config.warmup_epoch = 0
config.val_targets = ['lfw', 'cfp_fp', 'agedb_30']
