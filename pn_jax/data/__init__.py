"""Data: MVTec-layout reader, VisA, ELPV, plain folders, synthetic data and defects, tfds
builders, grain batches, and the inputs of predict (paths, folders, arrays).

tensorflow_datasets is imported only by `tfds_builders` (and the tfds backend of
`load_category`), so the direct path stays light.
"""
from pn_jax.data.anomalies import (cutpaste_anomaly, make_validation_records, perlin_anomaly,
                                   perlin_noise, synthesize_anomaly)
from pn_jax.data.elpv import ELPV_CATEGORIES, index_elpv
from pn_jax.data.folder import (folder_source, index_folder, index_test_dir, load_folders,
                                resolve_inputs)
from pn_jax.data.mvtec import MVTEC_CATEGORIES, MVTEC_URL, OFFLINE_DEMO, index_category, list_categories
from pn_jax.data.pipeline import (DATASETS, IMAGENET_MEAN, IMAGENET_STD, available_categories,
                                  index_dataset, load_category, make_batches, preprocess_record)
from pn_jax.data.preprocess import (IMAGE_EXTENSIONS, DataError, DataWarning, MissingDataError,
                                    array_to_images, array_to_rgb, is_image_file, load_mask,
                                    load_rgb, normalize, resize_image, resize_mask)
from pn_jax.data.records import (READ_LOG, SPLITS, ReadLog, Sample, Source, cap_samples,
                                 records_source, samples_source, split_train_holdout)
from pn_jax.data.synthetic import generate_category
from pn_jax.data.visa import VISA_CATEGORIES, index_visa
