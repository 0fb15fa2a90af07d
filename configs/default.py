"""Every configuration field of fdnm-jax, with its default and one comment each.

Data-set configs (`regdb.py`, `sysu.py`, `llcm.py`, `synthetic.py`) start from
`get_config()` here and change a few fields. Derived values (steps per epoch,
number of classes) are computed in code, never stored here. The defaults are the
full FDNM model with the paper recipe of FDNM_SPEC.md §3 (DEEN's recipe where the
paper is silent).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default (full FDNM, paper recipe) configuration."""
  config = ml_collections.ConfigDict()
  config.name = "fdnm"  # run name: used for results/<name>.json and reports.
  config.dataset = "synthetic"  # one of: synthetic, regdb, sysu, llcm, casia_nir_vis.
  config.seed = 0  # seeds parameter init, the identity sampler and augmentation.

  config.data = ml_collections.ConfigDict()
  config.data.root = ""  # folder of the data set as downloaded (its on-disk layout); "" = synthetic under the workdir.
  config.data.trial = 1  # RegDB split (1..10) used for training and testing.
  config.data.fold = 1  # CASIA NIR-VIS 2.0 fold (1..10, protocols/*_<fold>.txt) for training and testing.
  config.data.modality_folder_suffix = ""  # CASIA NIR-VIS 2.0: added to the listed VIS/NIR folder names ("_128x128").
  config.data.skip_missing_images = False  # CASIA NIR-VIS 2.0: skip (and count) listed images that are not on disk.
  config.data.data_dir = ""  # prepared TFDS folder (python -m input_pipeline.prepare; local or gs://); wins over root.
  config.data.num_val_ids = 0  # the N largest training ids held out for validation (0 = the paper's training set).
  config.data.skip_corrupt = False  # read from root: leave out (and count) images whose header check fails, not stop.

  config.synthetic = ml_collections.ConfigDict()
  config.synthetic.num_train_ids = 48  # identities in the synthetic train split.
  config.synthetic.num_test_ids = 24  # identities in the synthetic test split.
  config.synthetic.images_per_id = 8  # images per identity per modality.
  config.synthetic.num_cameras = 2  # cameras per modality.
  config.synthetic.height = 96  # stored image height (pixels).
  config.synthetic.width = 48  # stored image width (pixels).
  config.synthetic.seed = 0  # generator seed: the same seed gives the same images byte for byte.

  config.input = ml_collections.ConfigDict()
  config.input.height = 288  # network input height (pixels).
  config.input.width = 144  # network input width (pixels).
  config.input.resize = "pil_lanczos"  # train/test resize: pil_lanczos|pil_bicubic|pil_bilinear (PIL) | tf_bilinear.
  config.input.num_ids_per_batch = 6  # P: identities per training batch.
  config.input.num_instances = 4  # K: images per identity per modality in a batch (batch = 2*P*K).
  config.input.pad = 10  # zero padding before the random crop (pixels); 0 = no pad-and-crop.
  config.input.flip = True  # random horizontal flip (p=0.5).
  config.input.random_grayscale = 0.5  # probability of converting a training image to grayscale.
  config.input.random_erasing = 0.5  # probability of random erasing; 0 = off.
  config.input.erasing_area = (0.02, 0.4)  # random-erasing area range (fraction of the image).
  config.input.erasing_min_aspect = 0.3  # random-erasing minimum aspect ratio (max is its inverse).
  config.input.channel_aug = False  # CAJ channel augmentation (p=3/4: all channels <- one random channel).
  config.input.eval_batch_size = 64  # images per evaluation batch (global).
  config.input.prefetch = 2  # tf.data prefetch depth (batches).

  config.model = ml_collections.ConfigDict()
  config.model.stage_sizes = (3, 4, 6, 3)  # Bottleneck blocks per ResNet stage (ResNet-50).
  config.model.width = 64  # channels of the stem and the first stage's bottleneck (64 = ResNet-50).
  config.model.last_stride = 1  # stride of layer4 (1 keeps layer3's spatial size).
  config.model.dtype = "float32"  # compute dtype of activations and matmuls (float32 | bfloat16); params stay float32.
  config.model.agp_stages = (1, 2)  # ResNet stages followed by an AGP module; () = no AGP.
  config.model.agp_groups = 4  # AGP's C->C gate written as this many parallel C->C/groups maps.
  config.model.anm_stage = 4  # stage after which ANM runs; 0 = no ANM; 3 = DEEN-style (layer4 runs on the branches).
  config.model.anm_keep_original = False  # keep the original map as a branch beside the two nuance maps.
  config.model.num_parts = 0  # horizontal stripes pooled as local features; 0 = global features only.
  config.model.bn_momentum = 0.9  # BatchNorm running-average decay (PyTorch momentum 0.1).
  config.model.spectral_transform = "fft"  # AGP/ANM FFTs: fft (jnp.fft) | dft_matmul (DFT matrix products).
  config.model.anm_bn = "per_branch"  # ANM's BN: per_branch (own BN per map) | reference (one, called per map) | joint | none.
  config.model.anm_inorm_stats = "instance"  # ANM's instance-norm statistics: instance | exclude_dc (DC bin left out).
  config.model.phase_guard = "floor"  # AGP/ANM phase of near-zero bins: exact | reference | floor | soft.
  config.model.phase_floor = 1e-4  # phase_guard=floor: bins under this fraction of the channel RMS |X| get no phase.
  config.model.phase_soft_eps = 1e-4  # phase_guard=soft: X / sqrt(|X|^2 + eps^2), eps this fraction of the RMS |X|.
  config.model.conjugate_pairs = True  # AGP/ANM: treat the real FFT's Hermitian-paired bins as one.
  config.model.phase_cut = "arctan2"  # AGP, a bin on the negative real axis: arctan2 (-pi for a -0.0 imag) | principal (+pi).
  config.model.cnm_original = "raw"  # L_cnm's original: raw (pooled map) | batch_standardized (nuances' space).
  config.model.pretrained = ""  # torchvision-layout ResNet weights (.npz/.safetensors/.pth); "none" or "" = random init.
  config.model.require_pretrained = False  # a fresh run needs model.pretrained (a path, or "none" said explicitly).

  config.loss = ml_collections.ConfigDict()
  config.loss.id_weight = 1.0  # weight of the cross-entropy ID loss.
  config.loss.label_smoothing = 0.0  # label smoothing of the ID loss.
  config.loss.triplet = "hard"  # triplet form: hard (batch-hard) | wrt (weighted regularisation triplet).
  config.loss.triplet_weight = 1.0  # weight of the triplet loss.
  config.loss.triplet_margin = 0.3  # margin of the batch-hard triplet loss.
  config.loss.cnm_weight = 0.8  # weight of the center-guided nuances mining loss; 0 = off.
  config.loss.cnm_margin = 0.2  # margin of the center-guided nuances mining loss.
  config.loss.ortho_weight = 0.0  # weight of the orthogonality term between nuance branches (DEEN: 0.01).

  config.optim = ml_collections.ConfigDict()
  config.optim.base_lr = 0.01  # learning rate of the backbone and the frequency modules.
  config.optim.head_lr = 0.1  # learning rate of the BNNeck and the classifier.
  config.optim.momentum = 0.9  # SGD momentum.
  config.optim.nesterov = True  # Nesterov momentum.
  config.optim.weight_decay = 5e-4  # L2 weight decay added to the gradient (PyTorch SGD style), all params.

  config.schedule = ml_collections.ConfigDict()
  config.schedule.num_epochs = 150  # training length in epochs.
  config.schedule.steps_per_epoch = 0  # 0 = derive: ceil(max(#visible, #infrared) / (P*K)).
  config.schedule.warmup_epochs = 10  # linear warm-up: lr*(e+1)/warmup_epochs for e < warmup_epochs.
  config.schedule.decay_epochs = (20, 80)  # epochs at which the lr is multiplied by decay_factor.
  config.schedule.decay_factor = 0.1  # multiplicative lr decay at each decay epoch.

  config.evals = ml_collections.ConfigDict()
  config.evals.every_steps = 0  # evaluate every N steps during training; 0 = only at the end.
  config.evals.select_on_test = False  # periodic evals score (and select the best checkpoint on) the test set.
  config.evals.select_metric = "mAP"  # model selection: metric (mean over the settings) that picks the best.
  config.evals.sysu_gallery_sampling = "seeded"  # SYSU gallery: seeded (AGW random.seed(trial)) | official (.mat).
  config.evals.face_folds = ()  # face protocol: folds scored (mean +- std over them); () = config.data.fold.
  config.evals.test_flip = True  # test-time flip: embedding = image's + mirror's, not re-normalised (DEEN).
  config.evals.embedding = "spec"  # test embedding: spec (BNNeck feats of the branches) | deen (+ pooled: 6 sims).
  config.evals.recalibrate_bn_batches = 0  # precise BN before scoring: N un-augmented training batches; 0 = off.
  config.evals.recalibrate_bn_per_call = True  # precise BN: a BN called per branch gets per-call statistics.
  config.evals.health_max_mean_cosine = 0.95  # warn when test embeddings' mean cosine to their mean is above.
  config.evals.max_rank = 20  # length of the CMC curve.
  config.evals.query_chunk = 1024  # queries ranked at once by the jitted evaluator (bounds memory).
  config.evals.rerank = False  # --mode=eval: k-reciprocal re-ranking of the distances (Zhong et al., CVPR 2017).
  config.evals.rerank_k1 = 20  # re-ranking: size k1 of the k-reciprocal neighbourhoods.
  config.evals.rerank_k2 = 6  # re-ranking: neighbours k2 averaged by the local query expansion.
  config.evals.rerank_lambda = 0.3  # re-ranking: weight of the original distance (the Jaccard distance gets 1 - it).

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 500  # save a checkpoint every N steps (and at the end).
  config.checkpoint.keep = 3  # number of latest checkpoints kept.
  config.checkpoint.async_save = True  # save in the background (waited for before exit).

  config.logging = ml_collections.ConfigDict()
  config.logging.every_steps = 50  # write train metrics every N steps.

  config.visualize = ml_collections.ConfigDict()
  config.visualize.top_k = 10  # --mode=visualize: gallery images shown per query in the rank lists.
  config.visualize.num_bins = 50  # bins of each distance histogram (equal width, the panel's min..max distance).
  config.visualize.tsne_max_ids = 20  # identities (the lowest query ids) in each t-SNE scatter.
  config.visualize.tsne_perplexity = 30.0  # t-SNE perplexity (capped at (n - 1) / 3 for small sets).
  config.visualize.seed = 0  # t-SNE random_state.

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # devices on the data axis; -1 = all devices not used by other axes.
  config.mesh.fsdp = 1  # devices on the fsdp (parameter-sharding) axis.
  config.mesh.fsdp_min_size = 1 << 16  # kernels with at least this many elements are split over fsdp; smaller replicated.
  return config
