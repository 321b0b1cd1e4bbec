/* The decode kernels again with fp32 activations, tables and caches (see `elem.h`): the same
 * sources, their exported names ending in `_f32`. */
#define TUNERY_FP32 1

#include "decode_attention.c"
#include "lora_delta.c"
#include "rows.c"
#include "gelu.c"
#include "lora_train.c"
#include "train_attention.c"
