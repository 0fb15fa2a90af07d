"""The full FDNM (AGP after stages 1, 2, ANM after stage 4) at the smallest size whose layer4 map is 8 x 4 bins.

tests/configs/tiny.py's 32 x 16 input gives a 2 x 1 layer4 map, where ANM's instance norm over the 2 frequency
bins outputs exactly +-1 whatever the input: the nuances carry no information there. 128 x 64 images with
last_stride 1 give layer4 maps of 128/16 x 64/16 = 8 x 4 (8 x 3 rfft bins). Width 4 (layer4: 128 channels,
AGP's stage-1/2 maps 16/32 channels, divisible by agp_groups 4) and 4 identities x 2 images per modality keep a
train step cheap on a 2-core CPU. Everything else (identities, batch, schedule) is tiny.py's.
"""

from tests.configs import tiny


def get_config():
  config = tiny.get_config()
  config.name = "tiny_fdnm"
  config.synthetic.height = 128
  config.synthetic.width = 64
  config.input.height = 128
  config.input.width = 64
  config.input.pad = 4
  config.model.width = 4
  config.model.last_stride = 1  # the default, said because the 8 x 4 map depends on it.
  return config
