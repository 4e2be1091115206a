# IResNet-18 student distilled from an IResNet-100 teacher on Glint360K, CosFace, Partial FC 0.1.
# Not a published row: feature distillation as in the MFR challenge's small-model tracks.
# Dataset: Glint360K, 360,232 identities, 17,091,657 images; rec is a placeholder path.
# GPUs: 8 (one host); global batch 8 x 128 = 1,024.
# Launch: torchrun --nproc_per_node=8 -m partialfc.train configs/distill_r18_from_r100.py \
#             teacher_weights=work_dirs/glint360k_r100/model.pt
# loss = (1 - distill_weight) * CosFace + distill_weight * |s/|s| - t/|t||^2 on each image's embeddings;
# the r100 runs in eval mode without gradients on each rank's own images (about 3x the r18's forward).
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.network = 'r18'
config.resume = False
config.output = None  # work_dirs/distill_r18_from_r100
config.embedding_size = 512
config.sample_rate = 0.1
config.interclass_filtering_threshold = 0
config.fp16 = True
config.optimizer = 'sgd'
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128  # per GPU
config.lr = 0.2
config.verbose = 2000

config.teacher_network = 'r100'
config.teacher_weights = 'work_dirs/glint360k_r100/model.pt'  # placeholder: e.g. configs/glint360k_r100.py's model
config.teacher_embedding_size = 512  # the same as the student's: no projection
config.distill_loss = 'l2'
config.distill_weight = 0.5

config.rec = '/train_tmp/glint360k'
config.num_classes = 360232
config.num_image = 17091657
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ['lfw', 'cfp_fp', 'agedb_30']
