#include <iostream>

#include "lib/greet.h"

int main() {
  std::cout << Greeting("cairn") << std::endl;
  return 0;
}
