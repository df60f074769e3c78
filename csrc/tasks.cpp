#include "blockmdm.h"

namespace blockmdm {}  // namespace blockmdm
