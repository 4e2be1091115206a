# IResNet-100 on Glint360K, CosFace, all class centers, the MXNet partial_fc recipe.
# Seed row: [001 Glint360K] R100 | Glint360k(r=1.0) | IFRT African 89.50 | Caucasian 94.23 | Indian 93.54 | Asian 65.07 | ALL 88.67
# Dataset: Glint360K, 360,232 identities, 17,091,657 images; rec is a placeholder path.
# GPUs: 8 (one host); global batch 8 x 64 = 512.
# Launch: torchrun --nproc_per_node=8 -m partialfc.train configs/partial_fc_glint360k_r100_pfc10.py
#     or: horovodrun -np 8 -H localhost:8 bash config.sh configs/partial_fc_glint360k_r100_pfc10.py
# The recipe of the MXNet partial_fc 'glint360k_8GPU' setting: 64 per GPU, lr 0.1 divided by 10 at updates
# 200k, 400k, 500k and 550k of 600k (about 18 epochs), weight decay 5e-4, float32.
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.network = 'r100'
config.resume = False
config.output = None  # work_dirs/partial_fc_glint360k_r100_pfc10
config.embedding_size = 512
config.sample_rate = 1.0
config.interclass_filtering_threshold = 0
config.fp16 = False
config.optimizer = 'sgd'
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 64  # per GPU
config.lr = 0.1
config.lr_scheduler = 'step'
config.lr_steps = [200000, 400000, 500000, 550000]
config.max_steps = 600000
config.verbose = 2000

config.rec = '/train_tmp/glint360k'
config.num_classes = 360232
config.num_image = 17091657
config.num_epoch = 18
config.warmup_epoch = 0
config.val_targets = ['agedb_30', 'calfw', 'cfp_ff', 'cfp_fp', 'cplfw', 'lfw', 'vgg2_fp']
