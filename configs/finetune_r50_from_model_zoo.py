# Fine-tune an arcface_torch model-zoo IResNet-50 (backbone.pth) on a new dataset, ArcFace.
# Not a published row: a recipe for starting from released weights instead of from scratch.
# Dataset: your own, in rec (placeholder path); num_classes and num_image are read from it.
# GPUs: 8 (one host); global batch 8 x 128 = 1,024.
# Launch: torchrun --nproc_per_node=8 -m partialfc.train configs/finetune_r50_from_model_zoo.py \
#             rec=/data/my_faces init_backbone=/models/ms1mv3_arcface_r50/backbone.pth
# The new identities need a head of their own: the first 2,000 steps train only the class centers (the
# backbone and its BatchNorm statistics stay as released), then everything trains, the backbone at a tenth
# of the centers' lr, so the pretrained features move slowly while the new centers settle.
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)  # ArcFace, as the released r50
config.network = 'r50'
config.resume = False
config.output = None  # work_dirs/finetune_r50_from_model_zoo
config.embedding_size = 512  # the released models' size: the checkpoint must match it
config.sample_rate = 1.0
config.interclass_filtering_threshold = 0
config.fp16 = True
config.optimizer = 'sgd'
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128  # per GPU
config.lr = 0.02  # a tenth of training from scratch (0.2 at this batch)
config.verbose = 2000

config.init_backbone = '/models/ms1mv3_arcface_r50/backbone.pth'  # placeholder path
config.init_centers = None  # new identities: the centers start fresh
config.freeze_backbone_steps = 2000
config.backbone_lr_mult = 0.1  # backbone lr 0.002, centers 0.02

config.rec = '/train_tmp/my_faces'
config.num_classes = None
config.num_image = None
config.num_epoch = 5
config.warmup_epoch = 0
config.val_targets = ['lfw', 'cfp_fp', 'agedb_30']
