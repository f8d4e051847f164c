#include <iostream>

#include "lib/greet.h"

int main() {
  std::cout << Greeting("a remote worker") << std::endl;
  return 0;
}
