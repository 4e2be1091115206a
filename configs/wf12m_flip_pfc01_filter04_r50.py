# IResNet-50 on WebFace12M with 40% flipped labels, CosFace, Partial FC 0.1 with abnormal inter-class filtering (threshold 0.4).
# Seed row: [000 noisy] WF12M-Flip(40%)-PFC-0.1* | r50 | MFR-ALL 80.20 | IJB-C(1E-4) 96.11 | IJB-C(1E-5) 93.79
# Dataset: WebFace12M with 40% of the labels flipped (WF12M-Flip(40%)), 617,970 identities, 12,720,066 images; rec is a placeholder path.
# GPUs: 8 (one host); global batch 8 x 128 = 1,024.
# Launch: torchrun --nproc_per_node=8 -m partialfc.train configs/wf12m_flip_pfc01_filter04_r50.py
#     or: horovodrun -np 8 -H localhost:8 bash config.sh configs/wf12m_flip_pfc01_filter04_r50.py
# The seed's '*' is the inter-class filtering: interclass_filtering_threshold = 0.4.
# The seed does not give the GPU count of the noisy-data rows; 8 (one host) is assumed.
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.network = 'r50'
config.resume = False
config.output = None  # work_dirs/wf12m_flip_pfc01_filter04_r50
config.embedding_size = 512
config.sample_rate = 0.1
config.interclass_filtering_threshold = 0.4
config.fp16 = True
config.optimizer = 'sgd'
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128  # per GPU
config.lr = 0.1
config.verbose = 2000

config.rec = '/train_tmp/WebFace12M_FLIP40'
config.num_classes = 617970
config.num_image = 12720066
config.num_epoch = 20
config.warmup_epoch = 2
config.val_targets = []
